-- Takes or renews the change feed's lease for this Redis (one follower per Redis at a time) and
-- returns the mark it had reached. Safe to run late: a lease taken by a follower that gave up
-- lapses after its TTL and another takes it.
--
-- KEYS: lease, mark.
-- ARGV: token, ttl (milliseconds).
-- Returns {1, mark} ('' when there is none) to the holder, {0} to anyone else.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return {0} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local mark = redis.call('GET', KEYS[2])
return {1, mark or ''}
