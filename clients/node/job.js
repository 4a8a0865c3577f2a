#!/usr/bin/env node
// The durable job API (docs/jobs.md) from Node, written from the protos under ../../protos
// alone (loaded at run time, nothing generated), as `onnx-prune submit/watch/status/cancel/fetch`:
//
//   node job.js submit MODEL.onnx EVAL.npz [--idempotency-key KEY] [--mode zero|remove|nm]
//       [--tolerance 0.01] [--max-evaluations N] [--search-width K] [--retries N]   prints the job id
//   node job.js watch JOB [--from N] [--fail-unchanged] [--retries N]     progress, then the outcome
//   node job.js status JOB [--json]
//   node job.js cancel JOB
//   node job.js fetch JOB OUT.onnx [--report REPORT.json] [--force] [--retries N]
//   node job.js list [--limit N] [--state queued|running|succeeded|failed|cancelled]...
//
// Every command takes [--address HOST:PORT] [--token TOKEN | --token-file FILE] [--tls-ca CA.pem];
// the token may also come from ONNX_PRUNER_TOKEN.
//
// `submit`, `watch` and `fetch` outlive a dropped stream: on UNAVAILABLE (a restarted server, a
// proxy that dropped the stream) they reconnect with backoff (0.5 s doubling to 5 s), at most
// --retries times (default 8) in a row without progress: `submit` sends the upload again with the
// same idempotency key (its own random one when none is given), so the job is stored once;
// `watch` and `fetch` go on from the next event or the next byte. `fetch`
// writes OUT.part (resuming from its size when it exists, as `onnx-prune fetch` does), checks the
// size and SHA-256 of the whole file against the server's, then renames it to OUT; it never
// replaces an existing OUT without --force.
//
// Exit codes follow `onnx-prune`: 0 ok, 2 bad input (INVALID_ARGUMENT, UNAUTHENTICATED, NOT_FOUND,
// FAILED_PRECONDITION, an input over a limit), 4 server unavailable, 5 busy, 6 time limit,
// 130 cancelled, 1 anything else. `watch` exits by the job's outcome: 0 succeeded (3 when nothing
// could be pruned and --fail-unchanged is given), a failed job's exit code by its error_status,
// 130 cancelled.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');

const grpc = require('@grpc/grpc-js');

const common = require('./common');

const { EXIT, ExitError, UsageError } = common;
const COMMANDS = 'submit|watch|status|cancel|fetch|list';
const USAGE = `node job.js ${COMMANDS} ... ${common.CONNECTION_USAGE} (see the head of job.js)`;
const BACKOFF = { first: 0.5, max: 5 }; // seconds, as service/client.py
const DEFAULT_RETRIES = 8;
const STATES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'];
// the channel retries its connection soon after a restart, not after grpc-js's default backoff (up to 120 s)
const CHANNEL_OPTIONS = { 'grpc.initial_reconnect_backoff_ms': 250, 'grpc.max_reconnect_backoff_ms': 2000 };

const COMMAND_OPTIONS = {
  submit: { ...common.PRUNE_OPTIONS, 'idempotency-key': { type: 'string' }, retries: { type: 'string' } },
  watch: { from: { type: 'string', default: '0' }, 'fail-unchanged': { type: 'boolean' }, retries: { type: 'string' } },
  status: { json: { type: 'boolean' } },
  cancel: {},
  fetch: { report: { type: 'string' }, force: { type: 'boolean' }, retries: { type: 'string' } },
  list: { limit: { type: 'string' }, state: { type: 'string', multiple: true } },
};
const POSITIONALS = { submit: ['MODEL.onnx', 'EVAL.npz'], watch: ['JOB'], status: ['JOB'], cancel: ['JOB'],
  fetch: ['JOB', 'OUT.onnx'], list: [] };

function nonNegativeInteger(values, name, fallback) {
  if (values[name] === undefined) return fallback;
  const n = Number(values[name]);
  if (!/^\d+$/.test(values[name]) || !Number.isSafeInteger(n)) {
    throw new UsageError(`--${name} must be an integer >= 0, got ${values[name]}`);
  }
  return n;
}

function parse(argv) {
  const [command, ...rest] = argv;
  if (!(command in COMMAND_OPTIONS)) throw new UsageError(`give a command: ${COMMANDS}`);
  const { values, positionals } = common.parseCommandLine(rest, {
    ...common.CONNECTION_OPTIONS, ...COMMAND_OPTIONS[command],
  });
  const wanted = POSITIONALS[command];
  if (positionals.length !== wanted.length) {
    throw new UsageError(wanted.length ? `${command} takes ${wanted.join(' ')}` : `${command} takes no arguments`);
  }
  const args = { command, values, positionals, connection: common.connectionOf(values) };
  args.retries = nonNegativeInteger(values, 'retries', DEFAULT_RETRIES);
  if (command === 'submit') {
    args.config = common.pruneConfigOf(values);
    common.requireFiles(positionals);
  }
  if (command === 'list' && values.state) {
    for (const state of values.state) {
      if (!STATES.includes(state)) throw new UsageError(`--state must be one of ${STATES.join(', ')}, got ${state}`);
    }
  }
  return args;
}

function unary(client, method, request, token) {
  return new Promise((resolve, reject) => {
    client[method](request, common.metadata(token), { deadline: common.deadline(60) }, (err, res) =>
      (err ? reject(err) : resolve(res)));
  });
}

const sleep = (seconds) => new Promise((resolve) => setTimeout(resolve, seconds * 1000));

// Backoff between reconnects; gives up after `retries` attempts in a row without progress.
class Reconnect {
  constructor(what, retries) {
    this.what = what;
    this.retries = retries;
    this.progress();
  }

  progress() {
    this.attempt = 0;
    this.delay = BACKOFF.first;
  }

  // Waits before the next try when `error` is UNAVAILABLE and tries are left; else throws it.
  async after(error, from) {
    if (error.code !== grpc.status.UNAVAILABLE || this.attempt >= this.retries) throw error;
    this.attempt += 1;
    process.stderr.write(`${this.what}: connection lost (UNAVAILABLE: ${error.details}); reconnecting from ${from} ` +
      `in ${this.delay} s (try ${this.attempt} of ${this.retries})\n`);
    await sleep(this.delay);
    this.delay = Math.min(this.delay * 2, BACKOFF.max);
  }
}

function jobLines(job) {
  const rows = [['job', job.job_id], ['state', stateName(job.state)]];
  if (job.status) rows.push(['status', job.status]);
  if (job.error_code) rows.push(['error', `${job.error_code}: ${job.error_message}`]);
  if (job.result_sha256) rows.push(['result', `${job.result_size} bytes, sha256 ${job.result_sha256}`]);
  rows.push(['attempts', String(job.attempts)], ['events', String(job.events)]);
  if (job.cancel_requested && job.state === 'JOB_STATE_RUNNING') rows.push(['cancel', 'requested']);
  if (job.idempotency_key) rows.push(['idempotency key', job.idempotency_key]);
  const width = Math.max(...rows.map(([key]) => key.length));
  return rows.map(([key, value]) => `${key.padEnd(width)}  ${value}`).join('\n');
}

function stateName(state) {
  return String(state).replace('JOB_STATE_', '').toLowerCase();
}

function submitOnce(client, args, model, evalset, key) {
  return new Promise((resolve, reject) => {
    const call = client.SubmitJob(common.metadata(args.connection.token), (err, res) => (err ? reject(err) : resolve(res)));
    const requests = (function* () {
      yield { idempotency_key: key };
      for (const prune of common.pruneRequests(args.config, model, evalset)) yield { prune };
    })();
    common.send(call, requests).catch(reject);
  });
}

async function submit(client, args) {
  const [model, evalset] = args.positionals;
  // a submit cut off by UNAVAILABLE is sent again with the same key (the user's, or one of ours):
  // the server stores the job once
  const key = args.values['idempotency-key'] || crypto.randomUUID();
  const reconnect = new Reconnect('submit', args.retries);
  let reply = null;
  let attempts = 0;
  while (reply === null) {
    attempts += 1;
    try {
      reply = await submitOnce(client, args, model, evalset, key);
    } catch (error) {
      await reconnect.after(error, 'the start');
    }
  }
  // after a retry, an existing job may be the one our own cut-off attempt stored
  if (!reply.created && attempts === 1) {
    process.stderr.write(`the idempotency key names job ${reply.job_id}, submitted before\n`);
  }
  console.log(reply.job_id);
  return EXIT.OK;
}

// One WatchJob stream from `from`: calls onEvent for each event, resolves with the final Job (or null).
function watchOnce(client, args, jobId, from, onEvent) {
  return new Promise((resolve, reject) => {
    let final = null;
    const call = client.WatchJob({ job_id: jobId, from_event: from }, common.metadata(args.connection.token));
    call.on('data', (response) => {
      if (response.payload === 'event') onEvent(response.event);
      else if (response.payload === 'job') final = response.job;
    });
    call.on('error', reject);
    call.on('end', () => resolve(final));
  });
}

async function watch(client, args) {
  const [jobId] = args.positionals;
  let next = nonNegativeInteger(args.values, 'from', 0);
  const reconnect = new Reconnect('watch', args.retries);
  let job = null;
  while (job === null) {
    try {
      job = await watchOnce(client, args, jobId, next, (event) => {
        console.log(`event ${event.index}: ${common.eventLine(event.progress)}`);
        next = Number(event.index) + 1;
        reconnect.progress();
      });
      if (job === null) throw new Error(`the server ended the watch of job ${jobId} without its final status`);
    } catch (error) {
      await reconnect.after(error, `event ${next}`);
    }
  }
  return outcome(job, args.values['fail-unchanged']);
}

function outcome(job, failUnchanged) {
  if (job.state === 'JOB_STATE_SUCCEEDED') {
    const report = common.parseReport(job.report_json);
    const sparsity = report ? ` at sparsity ${(100 * report.sparsity).toFixed(1)}%` : '';
    console.log(`job ${job.job_id}: succeeded, ${job.status}${sparsity}; result ${job.result_size} bytes, ` +
      `sha256 ${job.result_sha256}`);
    if (failUnchanged && job.status === 'unchanged') {
      process.stderr.write('nothing could be pruned within the tolerance\n');
      return EXIT.UNCHANGED;
    }
    return EXIT.OK;
  }
  if (job.state === 'JOB_STATE_CANCELLED') {
    throw new ExitError(`job ${job.job_id} was cancelled: ${job.error_message || 'cancelled'}`, EXIT.CANCELLED);
  }
  if (job.state === 'JOB_STATE_FAILED') {
    const status = job.error_status ? `${common.statusName(job.error_status)}: ` : '';
    throw new ExitError(`job ${job.job_id} failed: ${status}${job.error_code}: ${job.error_message}`,
      job.error_status ? common.exitOfStatus(job.error_status) : EXIT.INTERNAL);
  }
  throw new ExitError(`job ${job.job_id} has not finished (${stateName(job.state)})`, EXIT.INTERNAL);
}

async function status(client, args) {
  const { job } = await unary(client, 'GetJob', { job_id: args.positionals[0] }, args.connection.token);
  console.log(args.values.json ? JSON.stringify(job, null, 2) : jobLines(job));
  return EXIT.OK;
}

async function cancel(client, args) {
  const { job } = await unary(client, 'CancelJob', { job_id: args.positionals[0] }, args.connection.token);
  console.log(jobLines(job));
  return EXIT.OK;
}

async function list(client, args) {
  const limit = nonNegativeInteger(args.values, 'limit', 0);
  const states = (args.values.state ?? []).map((state) => `JOB_STATE_${state.toUpperCase()}`);
  const { jobs } = await unary(client, 'ListJobs', { limit, states }, args.connection.token);
  for (const job of jobs) {
    const what = job.status || (job.error_code ? `${job.error_code}: ${job.error_message}` : '');
    const created = new Date(job.created * 1000).toISOString();
    console.log(`${job.job_id}  ${stateName(job.state).padEnd(9)}  ${created}  ${job.events} events  ${what}`.trimEnd());
  }
  return EXIT.OK;
}

// One DownloadResult stream from `offset`, appended to the open file `fd`; resolves with the server's
// size and sha256. `onBytes` is told each chunk's length.
function downloadOnce(client, args, jobId, offset, fd, onBytes) {
  return new Promise((resolve, reject) => {
    let announced = null;
    let at = offset;
    const call = client.DownloadResult({ job_id: jobId, offset }, common.metadata(args.connection.token));
    call.on('data', (response) => {
      if (Number(response.offset) !== at) {
        call.cancel();
        reject(new Error(`the server sent bytes from ${response.offset}, not from ${at}`));
        return;
      }
      announced = { size: Number(response.total_size), sha256: response.sha256 };
      fs.writeSync(fd, response.chunk);
      at += response.chunk.length;
      onBytes(response.chunk.length);
    });
    call.on('error', reject);
    call.on('end', () => resolve(announced));
  });
}

function sha256Of(file) {
  const hash = crypto.createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const block = Buffer.alloc(1 << 20);
    let n;
    while ((n = fs.readSync(fd, block, 0, block.length, null)) > 0) hash.update(block.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
  return hash.digest('hex');
}

async function fetch(client, args) {
  const [jobId, out] = args.positionals;
  const { force, report } = args.values;
  if (fs.existsSync(out) && fs.statSync(out).isDirectory()) {
    throw new ExitError(`${out} is a folder; give a file name`, EXIT.BAD_INPUT);
  }
  if (fs.existsSync(out) && !force) throw new ExitError(`${out} exists; pass --force to replace it`, EXIT.BAD_INPUT);
  const { job } = await unary(client, 'GetJob', { job_id: jobId }, args.connection.token);
  if (job.state !== 'JOB_STATE_SUCCEEDED') {
    const why = job.error_code ? ` (${job.error_code}: ${job.error_message})` : '';
    throw new ExitError(`the job ${jobId} is ${stateName(job.state)}, not succeeded${why}: it has no result`,
      EXIT.BAD_INPUT);
  }
  const part = `${out}.part`;
  let offset = fs.existsSync(part) ? fs.statSync(part).size : 0;
  if (offset > job.result_size) offset = 0; // not a part of this result
  const fd = fs.openSync(part, offset ? 'a' : 'w');
  let announced = { size: Number(job.result_size), sha256: job.result_sha256 };
  const reconnect = new Reconnect('fetch', args.retries);
  try {
    for (;;) {
      try {
        announced = (await downloadOnce(client, args, jobId, offset, fd, (n) => {
          offset += n;
          reconnect.progress();
        })) ?? announced;
        break;
      } catch (error) {
        await reconnect.after(error, `byte ${offset}`);
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  const size = fs.statSync(part).size;
  const digest = sha256Of(part);
  if (size !== announced.size || digest !== announced.sha256 || digest !== job.result_sha256) {
    fs.unlinkSync(part);
    throw new ExitError(`the downloaded result of job ${jobId} (${size} bytes, sha256 ${digest}) does not match ` +
      `the server's (${announced.size} bytes, sha256 ${announced.sha256}); fetch again`, EXIT.INTERNAL);
  }
  if (force) {
    fs.renameSync(part, out);
  } else {
    try {
      fs.linkSync(part, out); // fails if OUT appeared meanwhile: never replaced without --force
    } catch (error) {
      if (error.code === 'EEXIST') throw new ExitError(`${out} exists; pass --force to replace it`, EXIT.BAD_INPUT);
      throw error;
    }
    fs.unlinkSync(part);
  }
  if (report) fs.writeFileSync(report, job.report_json);
  console.log(`${out}: ${size} bytes, sha256 ${digest}`);
  return EXIT.OK;
}

async function main() {
  const args = parse(process.argv.slice(2));
  const { Pruner } = common.loadApi();
  const client = new Pruner(args.connection.address, common.credentials(args.connection), CHANNEL_OPTIONS);
  try {
    return await { submit, watch, status, cancel, fetch, list }[args.command](client, args);
  } finally {
    client.close();
  }
}

common.run(main, USAGE);
