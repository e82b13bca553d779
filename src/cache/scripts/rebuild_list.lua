-- Rebuilds the user's list from PostgreSQL's rows plus the user's dirty conversations,
-- atomically, so a save that finished before it is included and one after it updates the
-- rebuilt list. The caller read the user's dirty ids just before; if they changed since, nothing
-- is rebuilt and the caller reads them again (every key touched is declared here). The caller read
-- the list epoch before it read PostgreSQL's rows; if a change PostgreSQL committed has moved it
-- since (`follow.lua`), the rows may be older than that change: nothing is rebuilt, and the caller
-- reads PostgreSQL again.
--
-- KEYS: list, list meta, user dirty, list epoch, then a delete tombstone per PostgreSQL row, then
-- the conv key of each dirty id.
-- ARGV: list ttl, number of PostgreSQL rows, deadline (Redis's clock; past it the rows may be
-- older than a write made since: nothing is rebuilt), the list epoch read before the rows ('' for
-- none), then (id, score, entry) per row, then the dirty ids.
-- Returns what list.lua returns, false when the dirty ids changed, -4 past the deadline or -5 when
-- the epoch moved.
local t = redis.call('TIME')
if ARGV[3] ~= '' and tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[3]) then
  return -4
end
if (redis.call('GET', KEYS[4]) or '') ~= ARGV[4] then return -5 end
local rows = tonumber(ARGV[2])
local first_dirty = 5 + rows * 3
local dirty = #ARGV - first_dirty + 1
if redis.call('SCARD', KEYS[3]) ~= dirty then return false end
for i = 1, dirty do
  if redis.call('SISMEMBER', KEYS[3], ARGV[first_dirty + i - 1]) == 0 then return false end
end
redis.call('DEL', KEYS[1], KEYS[2])
for r = 0, rows - 1 do
  local a = 5 + r * 3
  if redis.call('EXISTS', KEYS[5 + r]) == 0 then
    redis.call('ZADD', KEYS[1], ARGV[a + 1], ARGV[a])
    redis.call('HSET', KEYS[2], ARGV[a], ARGV[a + 2])
  end
end
-- A dirty conversation's entry is made of its hash's own fields (the list entry's JSON, which the
-- hash does not keep: it would repeat them).
for i = 1, dirty do
  local h = redis.call('HMGET', KEYS[4 + rows + i], 'score', 'title', 'model', 'created_at', 'last_modified')
  if h[1] and h[2] and h[3] and h[4] and h[5] then
    local entry = cjson.encode({title = h[2], model = h[3], created_at = h[4], last_modified = h[5]})
    redis.call('ZADD', KEYS[1], h[1], ARGV[first_dirty + i - 1])
    redis.call('HSET', KEYS[2], ARGV[first_dirty + i - 1], entry)
  end
end
local ids = redis.call('ZREVRANGE', KEYS[1], 0, -1)
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id)
end
if #ids > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
return out
