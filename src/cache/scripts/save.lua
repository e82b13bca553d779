-- Stores a conversation staged in its own hash (by the HSET pipelined before this script) as the
-- user's dirty copy, atomically. Redis copies every script argument into Lua, and for a long
-- transcript that copy cost more than the rest of a save, so the transcript never passes through
-- here: the staged hash is renamed into place.
--
-- KEYS: conv, dirty set, list, list meta, user dirty, owner, dirty since, delete tombstone, staged,
-- late copy (also where a dirty copy an unguarded save does not extend is kept aside), late set.
-- ARGV: member, user, created_at, list entry, claim, id, floor, guard, local owner, deadline, late member,
-- replaces, base (the version of the copy the caller last read or saved; a cached copy at another
-- version is guarded: replaced only if the new messages extend it), score (the list's, as staged).
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
-- Copies are compared by their prefix fingerprints, never by their transcripts (which may be
-- compressed, and cost a copy into Lua per read): field `fps` holds 16 hex digits per message, the
-- i-th the fingerprint of the first i messages, or, in a compressed hash (which no seed-design reader
-- decodes anyway), field `fpb` the same fingerprints as 8 bytes each. The cached copy's are trusted
-- only while `fpm` (the transcript's byte length and last_modified when they were computed) still
-- matches; otherwise (a seed-design instance's write, a hash from a version before `fps`) they are
-- unknown (nil), and every check below then assumes what loses nothing. The staged copy's are this
-- save's own; a cached copy's in the other form (instances with other settings) are converted.
local staged = redis.call('HMGET', KEYS[9], 'fps', 'fpb')
local new = staged[2] or staged[1]
if not new then return {-3} end
-- Bytes per fingerprint, in the staged copy's form.
local w = staged[2] and 8 or 16
local local_owner = ARGV[9] == '1'
local owner = false
if local_owner then
  owner = redis.call('GET', KEYS[6])
  if owner and owner ~= ARGV[2] then
    redis.call('DEL', KEYS[9])
    return {-1}
  end
end
-- Everything the checks read of the cached copy, in one call; whether there is one at all, from
-- the same call unless none of its fields is there (then only EXISTS can tell).
local h = redis.call('HMGET', KEYS[1], 'ver', 'pgv', 'dirty', 'created_at', 'pgn', 'pgh', 'fps', 'fpm', 'last_modified',
  'fpb')
local exists = false
for i = 1, 10 do
  if h[i] then exists = true break end
end
if not exists then exists = redis.call('EXISTS', KEYS[1]) == 1 end
local old = nil
if (h[7] or h[10]) and h[8] == redis.call('HSTRLEN', KEYS[1], 'messages') .. '|' .. (h[9] or '') then
  if w == 8 then
    old = h[10] or (string.gsub(h[7], '%x%x', function(d) return string.char(tonumber(d, 16)) end))
  else
    old = h[7] or (string.gsub(h[10], '.', function(c) return string.format('%02x', string.byte(c)) end))
  end
end
local function at(p, i) return string.sub(p, w * i - w + 1, w * i) end
-- Whether the copy with fingerprints `a` starts with all the messages of the one with `b`.
local function holds(a, b)
  if not a or not b then return false end
  local n = #b / w
  return n == 0 or (#a >= #b and at(a, n) == at(b, n))
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if ARGV[10] ~= '' and now > tonumber(ARGV[10]) then
  if new == '' or (exists and holds(old, new)) then
    redis.call('DEL', KEYS[9])
    return {-4, 0}
  end
  redis.call('RENAME', KEYS[9], KEYS[10])
  redis.call('PERSIST', KEYS[10])
  redis.call('SADD', KEYS[11], ARGV[11])
  return {-4, 1}
end
if ARGV[12] ~= '' then
  local mark = (h[1] or '') .. '|' .. (h[9] or '') .. '|' .. redis.call('HSTRLEN', KEYS[1], 'messages')
    .. '|' .. redis.call('HSTRLEN', KEYS[1], 'title')
  if mark ~= ARGV[12] then
    redis.call('DEL', KEYS[9])
    return {2}
  end
end
if ARGV[5] ~= '1' and not exists then
  redis.call('DEL', KEYS[9])
  return {0}
end
local guarded = ARGV[8] == '1' or (ARGV[13] ~= '' and h[1] and h[1] ~= ARGV[13])
if guarded and exists and not holds(new, old) then
  redis.call('DEL', KEYS[9])
  return {2}
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
if not guarded and ARGV[12] == '' and exists and not holds(new, old) then
  -- Whether both copies have their first `i` messages in common. Unknown fingerprints say yes:
  -- the copy is then kept aside, and PostgreSQL's marks stay, so the flush checks the row against
  -- the copy itself.
  local function same(i)
    return not old or (i >= 1 and #old >= w * i and #new >= w * i and at(old, i) == at(new, i))
  end
  if h[3] == '1' then
    local k = math.min(tonumber(pgn or '0') or 0, old and #old / w or 0)
    if k == 0 or same(k) then
      redis.call('RENAME', KEYS[1], KEYS[10])
      redis.call('SADD', KEYS[11], ARGV[11])
    end
  end
  if pgv and not same(1) then pgn, pgh = '0', '0' end
end
local deleted = redis.call('GET', KEYS[8])
local ver = math.max(now, (tonumber(h[1] or '0') or 0) + 1, (tonumber(deleted or '0') or 0) + 1,
  (tonumber(h[2] or '0') or 0) + 1, (tonumber(ARGV[7]) or 0) + 1)
ver = string.format('%.0f', ver)
local created = h[4] or ARGV[3]
local fields = {'dirty', '1', 'ver', ver}
if created ~= ARGV[3] then
  table.insert(fields, 'created_at') table.insert(fields, created)
end
if pgn and pgv and pgh then
  table.insert(fields, 'pgn') table.insert(fields, pgn)
  table.insert(fields, 'pgv') table.insert(fields, pgv)
  table.insert(fields, 'pgh') table.insert(fields, pgh)
end
redis.call('HSET', KEYS[9], unpack(fields))
redis.call('RENAME', KEYS[9], KEYS[1])
redis.call('PERSIST', KEYS[1])
-- Always set: a settle leaves the record with the clean copy's TTL, and a dirty copy's must not expire.
if local_owner then redis.call('SET', KEYS[6], ARGV[2]) end
redis.call('SADD', KEYS[2], ARGV[1])
local first = 0
if redis.call('SADD', KEYS[5], ARGV[6]) == 1 and redis.call('SCARD', KEYS[5]) == 1 then first = 1 end
redis.call('ZADD', KEYS[7], 'NX', t[1], ARGV[1])
if deleted then redis.call('DEL', KEYS[8]) end
if redis.call('EXISTS', KEYS[3]) == 1 then
  local meta = ARGV[4]
  if created ~= ARGV[3] then
    local entry = cjson.decode(meta)
    entry['created_at'] = created
    meta = cjson.encode(entry)
  end
  redis.call('ZADD', KEYS[3], ARGV[14], ARGV[6])
  redis.call('HSET', KEYS[4], ARGV[6], meta)
end
return {1, ver, created, first}
