-- Compare-and-clear for flushed conversations. Only when the hash still holds what the flush read
-- (the same version, last_modified, and transcript and title lengths) does it become clean and get
-- its TTL back (or, when PostgreSQL kept something else, get dropped). A save of ours that raced
-- the flush changed the version; a seed-design writer's HSET keeps our version but changes the
-- rest; either way the hash stays dirty. What PostgreSQL now holds (pgn, pgv, pgh) is recorded
-- even when a newer save raced the flush. A dropped copy's owner record goes with it, so the next
-- save of the id asks PostgreSQL again, and so does the user's cached list (the next list rebuilds it).
--
-- KEYS: dirty set, dirty since, then per conversation: conv, user dirty, owner (a placeholder on a
-- cluster), list, list meta.
-- ARGV: ttl, local owner ('1' or '0'), deadline (Redis's clock; past it the flush gave up, and
-- nothing is settled: the next flush looks again), then per conversation: member, id, version written, action
-- ('clean' or 'drop'), pgn, pgv, pgh (empty when unknown), last_modified, messages length, title
-- length (empty to skip that check), user.
-- Returns {settled flag per conversation..., members left in the dirty set}.
local local_owner = ARGV[2] == '1'
local out = {}
local t = redis.call('TIME')
if ARGV[3] ~= '' and tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[3]) then
  for i = 1, (#KEYS - 2) / 5 do out[i] = 0 end
  out[#out + 1] = redis.call('SCARD', KEYS[1])
  return out
end
for i = 0, (#KEYS - 2) / 5 - 1 do
  local conv, user_dirty, owner, list, meta = KEYS[3 + 5 * i], KEYS[4 + 5 * i], KEYS[5 + 5 * i], KEYS[6 + 5 * i], KEYS[7 + 5 * i]
  local a = 3 + 11 * i
  local member, id, version, action = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local pgn, pgv, pgh = ARGV[a + 5], ARGV[a + 6], ARGV[a + 7]
  local lm, mlen, tlen, user = ARGV[a + 8], ARGV[a + 9], ARGV[a + 10], ARGV[a + 11]
  local settled = true
  if redis.call('EXISTS', conv) == 1 then
    local h = redis.call('HMGET', conv, 'ver', 'pgv', 'last_modified')
    local set = {}
    if pgv ~= '' and (tonumber(h[2] or '0') or 0) < tonumber(pgv) then
      set = {'pgn', pgn, 'pgv', pgv, 'pgh', pgh}
    end
    settled = (h[1] or '') == version
    if settled and lm ~= '' then
      settled = h[3] == lm and redis.call('HSTRLEN', conv, 'messages') == tonumber(mlen)
        and redis.call('HSTRLEN', conv, 'title') == tonumber(tlen)
    end
    if settled and action == 'clean' then
      set[#set + 1] = 'dirty'
      set[#set + 1] = '0'
    end
    if #set > 0 then redis.call('HSET', conv, unpack(set)) end
    if settled and action == 'clean' then
      redis.call('EXPIRE', conv, ARGV[1])
      if local_owner then redis.call('EXPIRE', owner, ARGV[1]) end
    elseif settled then
      -- The whole list goes, not the entry: when PostgreSQL's row won (a stale or diverged copy), the
      -- conversation is still the user's, and a list without its entry would be served without it.
      redis.call('DEL', conv, list, meta)
    end
  end
  if settled and action == 'drop' and local_owner and redis.call('GET', owner) == user then
    redis.call('DEL', owner)
  end
  if settled then
    redis.call('SREM', KEYS[1], member)
    redis.call('SREM', user_dirty, id)
    redis.call('ZREM', KEYS[2], member)
  end
  out[#out + 1] = settled and 1 or 0
end
out[#out + 1] = redis.call('SCARD', KEYS[1])
return out
