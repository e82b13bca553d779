-- Gives a clean conversation (one with a TTL) its TTL back; a dirty one has none and keeps none.
-- Only for servers without `EXPIRE ... GT` (Redis 6), which does the same in one command.
--
-- KEYS: conv. ARGV: ttl.
if redis.call('TTL', KEYS[1]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return 0
