-- Records how far the change feed's holder has brought this Redis, and renews its lease; only the
-- holder may. Run late, it can only set the mark back, which makes changes be applied again
-- (harmless: applying one is idempotent).
--
-- KEYS: lease, mark.
-- ARGV: token, mark, ttl (milliseconds).
-- Returns 1, or 0 when the lease is someone else's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
