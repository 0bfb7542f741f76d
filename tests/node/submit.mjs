// A lorafleet producer in Node.js, written from docs/protocol.md (wire protocol v1) alone.
//
//   node submit.mjs --redis-url redis://127.0.0.1:6379/0 --adapter support-bot "Hello"
//
// Options: --namespace NS (lorafleet), --client-id ID (random), --job-id ID (random), --adapter A,
// --chat (send the prompt as one user message), --stream, --max-new-tokens N, --max-waiting N
// (backpressure limit, 10000), --timeout S (30, also the job's deadline).
// Prints one JSON line {"event":"submitted","status":...} and then one JSON line per reply.
// Exit status: 0 result, 1 error reply, 3 timeout, 4 queue full, 2 bad arguments.

import { createHash, randomUUID } from 'node:crypto';
import { parseArgs } from 'node:util';
import { decode, encode } from '@msgpack/msgpack';
import { commandOptions, createClient } from 'redis';

// The submit script, verbatim from docs/protocol.md ("Submitting a job").
const SUBMIT_LUA = `-- lorafleet submit, protocol v1
-- KEYS[1] job stream {ns}:jobs:{queue}   KEYS[2] {ns}:waiting   KEYS[3] {ns}:wake
-- KEYS[4] {ns}:job:{id} (idempotency)    KEYS[5] {ns}:queues
-- ARGV[1] job (msgpack)   ARGV[2] queue   ARGV[3] max waiting per adapter (0: no limit)
-- ARGV[4] idempotency TTL (ms)   ARGV[5] wake stream MAXLEN   ARGV[6] consumer group
-- Returns {'ok', entry id} | {'duplicate', entry id of the first submit} | {'full', stream length}
local first = redis.call('GET', KEYS[4])
if first then
  return {'duplicate', first}
end
local length = redis.call('XLEN', KEYS[1])
local limit = tonumber(ARGV[3])
if limit > 0 and length >= limit then
  return {'full', length}
end
if length == 0 and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[6], '0', 'MKSTREAM')
end
local id = redis.call('XADD', KEYS[1], '*', 'j', ARGV[1])
redis.call('SET', KEYS[4], id, 'PX', ARGV[4])
-- A queue that was already waiting has been recorded and announced when it started waiting.
if redis.call('ZADD', KEYS[2], 'NX', string.match(id, '^%d+'), ARGV[2]) == 1 then
  redis.call('SADD', KEYS[5], ARGV[2])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'q', ARGV[2])
end
return {'ok', id}
`;
const SUBMIT_SHA = createHash('sha1').update(SUBMIT_LUA).digest('hex');
const BUFFERS = commandOptions({ returnBuffers: true });

const ADAPTER_PART = /^(?!\.)(?!.*\.\.)[A-Za-z0-9._-]+$/;

function checkAdapter(adapter) {
  const [name, version, ...rest] = adapter.split('@');
  const ok = (part, max) => part.length >= 1 && part.length <= max && ADAPTER_PART.test(part);
  if (rest.length > 0 || !ok(name, 128) || (version !== undefined && !ok(version, 64))) {
    throw new Error(`invalid adapter id ${JSON.stringify(adapter)}`);
  }
  return adapter;
}

function options() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      'redis-url': { type: 'string', default: process.env.LORAFLEET_REDIS_URL ?? 'redis://127.0.0.1:6379/0' },
      namespace: { type: 'string', default: 'lorafleet' },
      'client-id': { type: 'string', default: randomUUID().replaceAll('-', '').slice(0, 16) },
      'job-id': { type: 'string', default: randomUUID().replaceAll('-', '') },
      adapter: { type: 'string' },
      chat: { type: 'boolean', default: false },
      stream: { type: 'boolean', default: false },
      'max-new-tokens': { type: 'string' },
      'max-waiting': { type: 'string', default: '10000' },
      timeout: { type: 'string', default: '30' },
    },
  });
  if (positionals.length !== 1) throw new Error('give exactly one prompt');
  return { ...values, prompt: positionals[0] };
}

// The job map: `v`, `id`, `reply_to`, one of prompt/messages, optional fields.
function buildJob(opts, replyTo, now) {
  const job = { v: 1, id: opts['job-id'], reply_to: replyTo };
  if (opts.chat) job.messages = [{ role: 'user', content: opts.prompt }];
  else job.prompt = opts.prompt;
  if (opts.adapter) job.adapter = checkAdapter(opts.adapter);
  if (opts['max-new-tokens']) job.max_new_tokens = Number.parseInt(opts['max-new-tokens'], 10);
  if (opts.stream) job.stream = true;
  job.deadline = now + Number(opts.timeout);
  job.submitted_at = now;
  return job;
}

// EVALSHA the submit script; on NOSCRIPT, EVAL it (which also caches it).
async function runSubmit(client, keys, args) {
  const tail = [String(keys.length), ...keys, ...args];
  try {
    return await client.sendCommand(['EVALSHA', SUBMIT_SHA, ...tail], BUFFERS);
  } catch (error) {
    if (!String(error.message).startsWith('NOSCRIPT')) throw error;
    return await client.sendCommand(['EVAL', SUBMIT_LUA, ...tail], BUFFERS);
  }
}

function fieldOf(fields, name) {
  for (let i = 0; i + 1 < fields.length; i += 2) {
    if (fields[i].toString() === name) return fields[i + 1];
  }
  return undefined;
}

function print(object) {
  process.stdout.write(`${JSON.stringify(object)}\n`);
}

// Read the reply stream from 0-0 with XREAD BLOCK until the job's final reply; drop duplicates.
async function awaitFinal(reader, replyKey, jobId, deadlineMs) {
  let last = '0-0';
  let nextSeq = 0;
  while (Date.now() < deadlineMs) {
    const block = Math.max(1, Math.min(1000, deadlineMs - Date.now()));
    const response = await reader.sendCommand(
      ['XREAD', 'COUNT', '100', 'BLOCK', String(block), 'STREAMS', replyKey, last], BUFFERS);
    if (!response) continue;
    for (const [, entries] of response) {
      const read = [];
      for (const [rawId, fields] of entries) {
        last = rawId.toString();
        read.push(last);
        const reply = decode(fieldOf(fields, 'r'));
        if (reply.v !== 1) throw new Error(`reply of unsupported protocol version ${reply.v}`);
        if (reply.id !== jobId) continue; // another job of this client
        if (reply.type === 'chunk') {
          if (reply.seq < nextSeq) continue; // duplicate chunk
          nextSeq = reply.seq + 1;
          print(reply);
        } else if (reply.type === 'result' || reply.type === 'error') {
          print(reply);
          await reader.sendCommand(['XDEL', replyKey, ...read]);
          return reply;
        }
      }
      await reader.sendCommand(['XDEL', replyKey, ...read]);
    }
  }
  return null;
}

async function main() {
  let opts;
  try {
    opts = options();
  } catch (error) {
    process.stderr.write(`submit.mjs: ${error.message}\n`);
    return 2;
  }
  const ns = opts.namespace;
  const queue = opts.adapter ? opts.adapter : '~base';
  const replyKey = `${ns}:reply:${opts['client-id']}`;
  const client = createClient({ url: opts['redis-url'] });
  const reader = client.duplicate(); // XREAD BLOCK gets a connection of its own
  await client.connect();
  await reader.connect();
  try {
    const now = Date.now() / 1000;
    const job = buildJob(opts, replyKey, now);
    const keys = [`${ns}:jobs:${queue}`, `${ns}:waiting`, `${ns}:wake`, `${ns}:job:${job.id}`, `${ns}:queues`];
    const args = [Buffer.from(encode(job)), queue, opts['max-waiting'], String(3600 * 1000), '1000', 'workers'];
    const [status, value] = await runSubmit(client, keys, args);
    const answer = status.toString();
    if (answer === 'full') {
      print({ event: 'submitted', status: answer, adapter: opts.adapter ?? null, length: Number(value) });
      return 4;
    }
    print({ event: 'submitted', status: answer, id: job.id, entry_id: value.toString() });
    const final = await awaitFinal(reader, replyKey, job.id, (now + Number(opts.timeout) + 2) * 1000);
    if (final === null) {
      process.stderr.write(`no reply for job ${job.id}\n`);
      return 3;
    }
    return final.type === 'result' ? 0 : 1;
  } finally {
    await client.quit();
    await reader.quit();
  }
}

process.exitCode = await main();
