-- The user's cached list: ids newest first, each followed by its entry. When the list is not cached
-- (or an entry is missing), the list epoch instead ('' when there is none): the caller reads
-- PostgreSQL's rows and hands it to `rebuild_list.lua`, which caches them only if no change the
-- feed applied since has moved it.
--
-- KEYS: list, list meta, list epoch.
local function missing() return redis.call('GET', KEYS[3]) or '' end
if redis.call('EXISTS', KEYS[1]) == 0 then return missing() end
local ids = redis.call('ZREVRANGE', KEYS[1], 0, -1)
local out = {}
for _, id in ipairs(ids) do
  local entry = redis.call('HGET', KEYS[2], id)
  if not entry then return missing() end
  out[#out + 1] = id
  out[#out + 1] = entry
end
return out
