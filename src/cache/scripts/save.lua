-- Stores a conversation staged in its own hash (by the HSET pipelined before this script) as the
-- user's dirty copy, atomically. Redis copies every script argument into Lua, and for a long
-- transcript that copy cost more than the rest of a save, so the transcript never passes through
-- here: the staged hash is renamed into place.
--
-- KEYS: conv, dirty set, list, list meta, user dirty, owner, dirty since, delete tombstone, staged,
-- late copy (also where a dirty copy an unguarded save does not extend is kept aside), late set.
-- ARGV: member, user, created_at, meta, claim, id, floor, guard, local owner, deadline, late member,
-- replaces, base (the version of the copy the caller last read or saved; a cached copy at another
-- version is guarded: replaced only if the new messages extend it).
--
-- With `local owner` ('1': the owner record is in this slot, single node), the record is checked
-- and set here; on a cluster it lives in the id's own slot and is claimed before this runs (then
-- KEYS[6] is a placeholder of this slot, never touched).
--
-- Write order (docs/design.md, "Write order"): a save that runs after its `deadline` (Redis's
-- clock) arrived after its writer gave up on it, so something newer may be here already. It
-- changes nothing; its staged copy is kept aside as the late copy (in the late set, for the next
-- flush to put in conversation_conflicts) unless the cached copy holds all its messages.
--
-- Replies: {1, version, created_at, first} saved (`first`: 1 when the user had nothing dirty
-- before); {0} Redis does not hold the conversation (ask PostgreSQL who owns it, then save again
-- with `claim` and PostgreSQL's version as `floor`); {-1} another user's id; {-3} the staged hash
-- is gone (evicted between the two commands): nothing stored; {2} with `guard`: the new messages
-- do not extend the cached copy (the caller read an older copy from PostgreSQL while Redis did
-- not answer), or with `replaces`: the cached copy is no longer the one the caller kept aside:
-- nothing stored; {-4, kept} past the deadline: nothing stored, the copy kept aside (kept = 1) or
-- dropped because the cached copy holds its messages (0).
--
-- The version is Redis's clock in microseconds, bumped past the hash's version, past the
-- PostgreSQL version the copy was derived from, past `floor` and past a delete's tombstone, so a
-- later save never gets a lower version than a row it replaces, whatever the two clocks say.
if redis.call('EXISTS', KEYS[9]) == 0 then return {-3} end
local local_owner = ARGV[9] == '1'
if local_owner then
  local owner = redis.call('GET', KEYS[6])
  if owner and owner ~= ARGV[2] then
    redis.call('DEL', KEYS[9])
    return {-1}
  end
end
-- Whether the JSON array `a` starts with all the messages of the JSON array `b`.
local function holds(a, b)
  local n = #b - 1
  return b == '[]' or a == b or (n > 0 and string.sub(a, 1, n) == string.sub(b, 1, n) and string.sub(a, n + 1, n + 1) == ',')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if ARGV[10] ~= '' and now > tonumber(ARGV[10]) then
  local cached = redis.call('HGET', KEYS[1], 'messages')
  local late = redis.call('HGET', KEYS[9], 'messages') or '[]'
  if late == '[]' or (cached and holds(cached, late)) then
    redis.call('DEL', KEYS[9])
    return {-4, 0}
  end
  redis.call('RENAME', KEYS[9], KEYS[10])
  redis.call('PERSIST', KEYS[10])
  redis.call('SADD', KEYS[11], ARGV[11])
  return {-4, 1}
end
if ARGV[12] ~= '' then
  local h = redis.call('HMGET', KEYS[1], 'ver', 'last_modified')
  local mark = (h[1] or '') .. '|' .. (h[2] or '') .. '|' .. redis.call('HSTRLEN', KEYS[1], 'messages')
    .. '|' .. redis.call('HSTRLEN', KEYS[1], 'title')
  if mark ~= ARGV[12] then
    redis.call('DEL', KEYS[9])
    return {2}
  end
end
if ARGV[5] ~= '1' and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[9])
  return {0}
end
local h = redis.call('HMGET', KEYS[1], 'ver', 'pgv', 'dirty', 'created_at', 'pgn', 'pgh')
local guarded = ARGV[8] == '1' or (ARGV[13] ~= '' and h[1] and h[1] ~= ARGV[13])
if guarded and redis.call('EXISTS', KEYS[1]) == 1 then
  local old = redis.call('HGET', KEYS[1], 'messages') or '[]'
  local new = redis.call('HGET', KEYS[9], 'messages') or '[]'
  if not holds(new, old) then
    redis.call('DEL', KEYS[9])
    return {2}
  end
end
-- An unguarded save over a copy its messages do not extend is an edit, or a save built on a read
-- another instance served from PostgreSQL while Redis held this newer copy (docs/design.md, "Write
-- order"). The writer cannot tell the two apart; what tells a save built on such a read is that it
-- starts with what PostgreSQL held then. So a dirty copy whose first `pgn` messages (what PostgreSQL
-- holds; none when it holds nothing) the save keeps is kept aside as a late copy is (its `dirty`
-- flag tells the flush which it is), for the flush to put in conversation_conflicts unless
-- PostgreSQL holds it. The marks of what PostgreSQL holds stay: the flush writes a copy over the
-- row they name only when the copy starts with that row, and otherwise keeps the row aside unless
-- the copy holds it. A save that shares not even its first message with the copy (the id reused
-- for other content) replaces the row whole: its marks say PostgreSQL's row holds none of it.
local pgn, pgv, pgh = h[5], h[2], h[6]
if not guarded and ARGV[12] == '' and redis.call('EXISTS', KEYS[1]) == 1 then
  local old = redis.call('HGET', KEYS[1], 'messages') or '[]'
  local new = redis.call('HGET', KEYS[9], 'messages') or '[]'
  if not holds(new, old) then
    local olds, news = cjson.decode(old), cjson.decode(new)
    local function same(i)
      local a, b = olds[i], news[i]
      return a ~= nil and b ~= nil and a.role == b.role and a.content == b.content and a.time == b.time
    end
    if h[3] == '1' then
      local from_postgres = true
      for i = 1, math.min(tonumber(pgn or '0') or 0, #olds) do
        if not same(i) then from_postgres = false break end
      end
      if from_postgres then
        redis.call('RENAME', KEYS[1], KEYS[10])
        redis.call('SADD', KEYS[11], ARGV[11])
      end
    end
    if pgv and not same(1) then pgn, pgh = '0', '0' end
  end
end
local deleted = tonumber(redis.call('GET', KEYS[8]) or '0') or 0
local ver = math.max(now, (tonumber(h[1] or '0') or 0) + 1, deleted + 1,
  (tonumber(h[2] or '0') or 0) + 1, (tonumber(ARGV[7]) or 0) + 1)
ver = string.format('%.0f', ver)
local created = h[4] or ARGV[3]
local meta = ARGV[4]
if created ~= ARGV[3] then
  local entry = cjson.decode(meta)
  entry['created_at'] = created
  meta = cjson.encode(entry)
  redis.call('HSET', KEYS[9], 'created_at', created)
end
redis.call('HSET', KEYS[9], 'dirty', '1', 'ver', ver, 'meta', meta)
if pgn and pgv and pgh then
  redis.call('HSET', KEYS[9], 'pgn', pgn, 'pgv', pgv, 'pgh', pgh)
end
redis.call('RENAME', KEYS[9], KEYS[1])
redis.call('PERSIST', KEYS[1])
if local_owner then redis.call('SET', KEYS[6], ARGV[2]) end
local first = redis.call('SCARD', KEYS[5]) == 0 and 1 or 0
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[6])
redis.call('ZADD', KEYS[7], 'NX', t[1], ARGV[1])
redis.call('DEL', KEYS[8])
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'score'), ARGV[6])
  redis.call('HSET', KEYS[4], ARGV[6], meta)
end
return {1, ver, created, first}
