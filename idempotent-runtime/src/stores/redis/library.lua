#!lua name=idempotent_$V

local IN_PROGRESS, COMPLETED, RELEASED = 225, 226, 227
local HEAD = '>BBI4I8I8'
local NO_LEASE = '\0\0\0\0\0\0\0\0'
-- Lua numbers are doubles: tokens and times stay below 2^53 - 1, so that every value
-- read, incremented and written back is exact (a larger one is a corrupt record)
local MAX_EXACT = 9007199254740991

local function now_us()
  local t = redis.call('TIME')
  return t[1] * 1000000 + t[2]
end

local function int(n)
  return string.format('%d', n)
end

-- Checks the record `v`. Returns its state, flags, attempts, token, lease deadline and
-- the position of the last byte of its fingerprint part (22 without a fingerprint),
-- or nil and why `v` is not a record.
local function decode(v)
  local n = #v
  if n < 22 then
    return nil, 'a ' .. n .. '-byte string is too short for a record'
  end
  local state, flags, attempts, token, lease = struct.unpack(HEAD, v)
  if state < IN_PROGRESS or state > RELEASED then
    return nil, 'unknown record tag ' .. state
  end
  if flags > 3 then
    return nil, 'unknown flags ' .. flags
  end
  if token < 1 then
    return nil, 'zero token'
  end
  if token >= MAX_EXACT or lease >= MAX_EXACT then
    return nil, 'token or lease deadline out of range'
  end
  local e = 22
  if flags % 2 == 1 then
    if n < 26 then
      return nil, 'truncated fingerprint length'
    end
    e = 26 + struct.unpack('>I4', v, 23)
    if e > n then
      return nil, 'truncated fingerprint'
    end
  end
  if flags < 2 and e < n then
    return nil, (n - e) .. ' unexpected trailing bytes'
  end
  return state, flags, attempts, token, lease, e
end

-- The string under `key`, false when absent, nil and a reason for another type.
local function get(key)
  local v = redis.pcall('GET', key)
  if type(v) == 'table' then
    return nil, 'the key holds a ' .. redis.call('TYPE', key).ok .. ', not a string'
  end
  return v
end

-- For a step by the claim of `token` that leaves the record in state `done` (nil for
-- a renewal): the record, its flags and the end of its fingerprint part when the claim
-- owns it (in progress, same token); else false and, in place of the flags, the step's
-- reply: {0, reason} corrupt, 1 held when the record is in `done` under `token` already
-- (a retry of a step whose reply was lost), 2 lost (no record, or not this claim's).
local function step_on(key, token, done)
  local v, err = get(key)
  if v == nil then
    return false, {0, err}
  end
  if not v then
    return false, 2
  end
  local state, flags, _, t, _, e = decode(v)
  if not state then
    return false, {0, flags}
  end
  if state ~= IN_PROGRESS or t ~= tonumber(token) then
    if state == done and t == tonumber(token) then
      return false, 1
    end
    return false, 2
  end
  return v, flags, e
end

-- Writes `v`, keeping the key's expiry at least `keep_ms` away (a later expiry, or
-- none, stays).
local function save_extend(key, v, keep_ms)
  local pttl = redis.call('PTTL', key)
  if pttl == -1 then
    redis.call('SET', key, v, 'KEEPTTL')
  else
    redis.call('SET', key, v, 'PX', int(math.max(pttl, keep_ms)))
  end
end

-- ARGV lease µs, keep ms, max attempts (0: none)[, fingerprint].
-- Reply, shortest for the two common answers: token (an integer) acquired for the
-- first attempt, output (a string) completed; otherwise {0, reason} corrupt,
-- {1, token, attempt} acquired, {2} completed without output, {3, retry after µs} in
-- progress, {4, attempts} exhausted, {5} fingerprint mismatch.
local function claim(keys, args)
  local key = keys[1]
  local fp = args[4]
  local v, err = get(key)
  if v == nil then
    return {0, err}
  end
  if not v then
    local now = now_us()
    local rec
    if fp then
      rec = struct.pack('>BBI4I8I8I4', IN_PROGRESS, 1, 1, now, now + args[1], #fp) .. fp
    else
      rec = struct.pack(HEAD, IN_PROGRESS, 0, 1, now, now + args[1])
    end
    redis.call('SET', key, rec, 'PX', args[2])
    return now
  end
  local state, flags, attempts, token, lease, e = decode(v)
  if not state then
    return {0, flags}
  end
  local has_fp = flags % 2 == 1
  if fp and has_fp and string.sub(v, 27, e) ~= fp then
    return {5}
  end
  if state == COMPLETED then
    if flags >= 2 then
      return string.sub(v, e + 1)
    end
    return {2}
  end
  local now = now_us()
  if state == IN_PROGRESS and lease > now then
    return {3, lease - now}
  end
  local max = tonumber(args[3])
  if max > 0 and attempts >= max then
    return {4, attempts}
  end
  if attempts < 4294967295 then
    attempts = attempts + 1
  end
  token = math.max(token + 1, now)
  local f, rest = 0, ''
  if has_fp then
    f, rest = 1, string.sub(v, 23, e)
  elseif fp then
    f, rest = 1, struct.pack('>I4', #fp) .. fp
  end
  local rec = struct.pack(HEAD, IN_PROGRESS, f, attempts, token, now + args[1]) .. rest
  save_extend(key, rec, tonumber(args[2]))
  return {1, token, attempts}
end

-- ARGV token, ttl ms[, output]. Reply {0, reason} | 1 held | 2 lost.
local function complete(keys, args)
  local key = keys[1]
  local v, flags, e = step_on(key, args[1], COMPLETED)
  if not v then
    return flags
  end
  local out = args[3]
  local f = flags % 2
  if out then
    f = f + 2
  else
    out = ''
  end
  local rec = string.char(COMPLETED, f) .. string.sub(v, 3, 14) .. NO_LEASE
    .. string.sub(v, 23, e) .. out
  redis.call('SET', key, rec, 'PX', args[2])
  return 1
end

-- ARGV token. Reply {0, reason} | 1 held | 2 lost.
local function release(keys, args)
  local key = keys[1]
  local v, flags, e = step_on(key, args[1], RELEASED)
  if not v then
    return flags
  end
  local rec = string.char(RELEASED, flags % 2) .. string.sub(v, 3, 14) .. NO_LEASE
    .. string.sub(v, 23, e)
  redis.call('SET', key, rec, 'KEEPTTL')
  return 1
end

-- ARGV token, lease µs, lease ms. Reply {0, reason} | 1 held | 2 lost.
local function renew(keys, args)
  local key = keys[1]
  local v, reply = step_on(key, args[1], nil)
  if not v then
    return reply
  end
  local rec = string.sub(v, 1, 14) .. struct.pack('>I8', now_us() + args[2])
    .. string.sub(v, 23)
  save_extend(key, rec, tonumber(args[3]))
  return 1
end

-- Reply {0, reason} | {2} absent |
-- {1, state, attempts, token, lease left µs or -1, pttl ms, has fp, fp, has output, output}.
local function inspect(keys)
  local key = keys[1]
  local v, err = get(key)
  if v == nil then
    return {0, err}
  end
  if not v then
    return {2}
  end
  local state, flags, attempts, token, lease, e = decode(v)
  if not state then
    return {0, flags}
  end
  local now = now_us()
  local left = -1
  if state == IN_PROGRESS and lease > now then
    left = lease - now
  end
  local has_fp, fp, has_out, out = 0, '', 0, ''
  if flags % 2 == 1 then
    has_fp, fp = 1, string.sub(v, 27, e)
  end
  if flags >= 2 then
    has_out, out = 1, string.sub(v, e + 1)
  end
  return {1, state, attempts, token, left, redis.call('PTTL', key), has_fp, fp, has_out, out}
end

-- The batch forms: one call over many keys (on a cluster, keys of one hash slot),
-- `n` arguments per key; the reply holds each key's answer, in order.
local function claim_args(args, b)
  local a = {args[b + 1], args[b + 2], args[b + 3]}
  if args[b + 4] == '1' then
    a[4] = args[b + 5]
  end
  return a
end

local function complete_args(args, b)
  local a = {args[b + 1], args[b + 2]}
  if args[b + 3] == '1' then
    a[3] = args[b + 4]
  end
  return a
end

local function release_args(args, b)
  return {args[b + 1]}
end

local function many(step, n, args_of)
  return function(keys, args)
    local out = {}
    for i = 1, #keys do
      out[i] = step({keys[i]}, args_of(args, (i - 1) * n))
    end
    return out
  end
end

redis.register_function('idempotent_$V_claim', claim)
redis.register_function('idempotent_$V_complete', complete)
redis.register_function('idempotent_$V_release', release)
redis.register_function('idempotent_$V_renew', renew)
redis.register_function('idempotent_$V_inspect', inspect)
redis.register_function('idempotent_$V_claim_many', many(claim, 5, claim_args))
redis.register_function('idempotent_$V_complete_many', many(complete, 4, complete_args))
redis.register_function('idempotent_$V_release_many', many(release, 1, release_args))
