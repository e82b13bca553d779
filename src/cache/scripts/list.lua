-- The user's cached list: ids newest first, each followed by its entry, or nil when the list is
-- not cached or an entry is missing.
--
-- KEYS: list, list meta.
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local ids = redis.call('ZREVRANGE', KEYS[1], 0, -1)
local out = {}
for _, id in ipairs(ids) do
  local entry = redis.call('HGET', KEYS[2], id)
  if not entry then return false end
  out[#out + 1] = id
  out[#out + 1] = entry
end
return out
