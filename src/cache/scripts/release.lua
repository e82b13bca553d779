-- On a cluster: after a delete or a dropped copy, removes the id's owner record if it is still the
-- user's; with a ttl, gives it that TTL instead (the conversation became clean).
--
-- KEYS: owner. ARGV: user, ttl (empty to remove), deadline (Redis's clock; past it: nothing).
local t = redis.call('TIME')
if ARGV[3] ~= '' and tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[3]) then
  return 0
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 1
