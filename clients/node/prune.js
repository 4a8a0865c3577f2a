#!/usr/bin/env node
// An onnx-pruner client in Node, written from the protos under ../../protos alone
// (loaded at run time, nothing generated). It checks the server's health, lists
// the model's prunable layers (Inspect), prunes the model against an .npz eval
// set (Prune) printing progress, and writes the pruned model.
//
//   node prune.js MODEL.onnx EVAL.npz OUT.onnx [--address HOST:PORT] [--token TOKEN]
//       [--token-file FILE] [--tls-ca CA.pem] [--mode zero|remove|nm] [--tolerance 0.01]
//       [--max-evaluations N] [--report REPORT.json]
//
// The bearer token may also come from ONNX_PRUNER_TOKEN. Exit codes follow
// `onnx-prune`: 0 pruned, 3 unchanged, 2 bad input (INVALID_ARGUMENT,
// UNAUTHENTICATED, an input over a server limit), 4 server unavailable,
// 5 server busy, 6 time limit, 130 cancelled, 1 anything else.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const SERVICE = 'onnxpruner.v1.PrunerService';
const CHUNK_BYTES = 1 << 20; // the proto's limit per chunk
const EXIT = { OK: 0, INTERNAL: 1, BAD_INPUT: 2, UNCHANGED: 3, UNAVAILABLE: 4, BUSY: 5, TIME_LIMIT: 6, CANCELLED: 130 };

function loadApi() {
  const definition = protoLoader.loadSync(['onnxpruner/v1/pruner.proto', 'grpc/health/v1/health.proto'], {
    includeDirs: [PROTOS],
    keepCase: true, // field names as in the proto: model_chunk, report_json
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true, // a message's `payload` names the oneof field it carries
  });
  const api = grpc.loadPackageDefinition(definition);
  return { Pruner: api.onnxpruner.v1.PrunerService, Health: api.grpc.health.v1.Health };
}

// google.rpc.Status and its details (grpc-status-details-bin), from the shipped google/rpc protos
function loadStatusTypes() {
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) => path.join(PROTOS, target); // google/protobuf/* are bundled
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  return root;
}

function usage(message) {
  process.stderr.write(`error: ${message}\nusage: node prune.js MODEL.onnx EVAL.npz OUT.onnx [--address HOST:PORT] ` +
    '[--token TOKEN | --token-file FILE] [--tls-ca CA.pem] [--mode zero|remove|nm] [--tolerance 0.01] ' +
    '[--max-evaluations N] [--report REPORT.json]\n');
  process.exit(EXIT.BAD_INPUT);
}

function parse(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        address: { type: 'string', default: '127.0.0.1:50051' },
        token: { type: 'string' },
        'token-file': { type: 'string' },
        'tls-ca': { type: 'string' },
        mode: { type: 'string', default: 'zero' },
        tolerance: { type: 'string', default: '0.01' },
        'max-evaluations': { type: 'string' },
        report: { type: 'string' },
      },
    });
  } catch (e) {
    usage(e.message);
  }
  const { values, positionals } = parsed;
  if (positionals.length !== 3) usage('give MODEL.onnx EVAL.npz OUT.onnx');
  if (!['zero', 'remove', 'nm'].includes(values.mode)) usage(`unknown --mode ${values.mode}`);
  const tolerance = Number(values.tolerance);
  if (!Number.isFinite(tolerance) || tolerance < 0) usage(`--tolerance must be a number >= 0, got ${values.tolerance}`);
  let token = values.token ?? process.env.ONNX_PRUNER_TOKEN;
  if (values['token-file']) token = fs.readFileSync(values['token-file'], 'utf8').trim();
  const config = {
    mode: `MODE_${values.mode.toUpperCase()}`,
    tolerance: { value: tolerance, relative: false },
  };
  if (values['max-evaluations'] !== undefined) {
    const n = Number(values['max-evaluations']);
    if (!Number.isInteger(n) || n < 1) usage(`--max-evaluations must be a positive integer, got ${values['max-evaluations']}`);
    config.max_evaluations = n;
  }
  const [model, evalset, output] = positionals;
  for (const file of [model, evalset]) {
    if (!fs.existsSync(file)) usage(`${file} does not exist`);
  }
  return { address: values.address, token, tlsCa: values['tls-ca'], config, model, evalset, output, report: values.report };
}

function credentials(args) {
  return args.tlsCa ? grpc.credentials.createSsl(fs.readFileSync(args.tlsCa)) : grpc.credentials.createInsecure();
}

function metadata(token) {
  const md = new grpc.Metadata();
  if (token) md.set('authorization', `Bearer ${token}`);
  return md;
}

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

// Writes messages to a client stream, waiting for 'drain' when grpc-js buffers enough.
async function send(call, messages) {
  for (const message of messages) {
    if (!call.write(message)) await new Promise((resolve) => call.once('drain', resolve));
  }
  call.end(); // half-close: the server starts the job
}

function* chunks(file, wrap) {
  const data = fs.readFileSync(file);
  for (let start = 0; start < data.length; start += CHUNK_BYTES) {
    yield wrap(data.subarray(start, start + CHUNK_BYTES));
  }
}

async function checkHealth(Health, args) {
  const client = new Health(args.address, credentials(args));
  try {
    const reply = await new Promise((resolve, reject) =>
      client.Check({ service: SERVICE }, { deadline: deadline(10) }, (err, res) => (err ? reject(err) : resolve(res))));
    console.log(`health: ${reply.status}`);
    return reply.status;
  } finally {
    client.close();
  }
}

async function inspect(client, args) {
  const reply = await new Promise((resolve, reject) => {
    const call = client.Inspect(metadata(args.token), { deadline: deadline(120) }, (err, res) =>
      (err ? reject(err) : resolve(res)));
    send(call, chunks(args.model, (chunk) => ({ model_chunk: chunk }))).catch(reject);
  });
  console.log(`inspect: ${reply.layers.length} prunable layers, ${reply.prunable_params} of ` +
    `${reply.total_params} parameters prunable, ${reply.skipped.length} weights skipped`);
  return reply;
}

async function prune(client, args) {
  const call = client.Prune(metadata(args.token));
  const parts = [];
  let result = null;
  const done = new Promise((resolve, reject) => {
    call.on('data', (response) => {
      if (response.payload === 'progress') {
        const e = response.progress;
        console.log(`progress: [${e.evaluation}/${e.max_evaluations}] ${e.kind.replace('EVENT_KIND_', '').toLowerCase()}: ` +
          e.message);
      } else if (response.payload === 'result') {
        result = response.result;
      } else if (response.payload === 'model_chunk') {
        parts.push(response.model_chunk);
      }
    });
    call.on('error', reject);
    call.on('end', resolve);
  });
  const requests = [
    { config: args.config },
    ...chunks(args.model, (chunk) => ({ model_chunk: chunk })),
    ...chunks(args.evalset, (chunk) => ({ eval_npz_chunk: chunk })),
  ];
  await Promise.all([send(call, requests), done]);
  if (result === null) throw new Error('the server ended the call without a result');
  const model = Buffer.concat(parts);
  const digest = crypto.createHash('sha256').update(model).digest('hex');
  if (model.length !== Number(result.model_size) || digest !== result.model_sha256) {
    throw new Error(`the model received (${model.length} bytes, sha256 ${digest}) is not the one announced ` +
      `(${result.model_size} bytes, sha256 ${result.model_sha256})`);
  }
  fs.writeFileSync(args.output, model);
  if (args.report) fs.writeFileSync(args.report, result.report_json);
  const report = parseReport(result.report_json);
  const sparsity = report ? ` at sparsity ${(100 * report.sparsity).toFixed(1)}%` : '';
  console.log(`result: ${result.status}${sparsity}; wrote ${args.output} (${model.length} bytes)`);
  return result.status;
}

// report_json may hold the bare tokens NaN/Infinity (pruner.proto, PruneResult.report_json)
function parseReport(text) {
  try {
    return JSON.parse(text.replace(/([:[,]\s*)(-?Infinity|NaN)(?=\s*[,\]}])/g, '$1null'));
  } catch {
    return null;
  }
}

function describe(error, statusTypes) {
  const name = Object.keys(grpc.status).find((key) => grpc.status[key] === error.code) ?? String(error.code);
  const notes = [];
  let retry = false;
  const raw = error.metadata?.get('grpc-status-details-bin')?.[0];
  if (raw) {
    const Status = statusTypes.lookupType('google.rpc.Status');
    for (const any of Status.decode(raw).details) {
      const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
      const detail = statusTypes.lookupType(typeName).decode(any.value);
      if (typeName === 'google.rpc.BadRequest') {
        notes.push(...detail.field_violations.filter((v) => v.field).map((v) => `field ${v.field}`));
      } else if (typeName === 'google.rpc.QuotaFailure') {
        notes.push(...detail.violations.map((v) => `limit ${v.subject}`));
      } else if (typeName === 'google.rpc.RetryInfo') {
        retry = true;
        const delay = detail.retry_delay;
        notes.push(`retry in ${Number(delay?.seconds ?? 0) + (delay?.nanos ?? 0) / 1e9} s`);
      }
    }
  }
  const exit = {
    [grpc.status.INVALID_ARGUMENT]: EXIT.BAD_INPUT,
    [grpc.status.UNAUTHENTICATED]: EXIT.BAD_INPUT,
    [grpc.status.RESOURCE_EXHAUSTED]: retry ? EXIT.BUSY : EXIT.BAD_INPUT,
    [grpc.status.UNAVAILABLE]: EXIT.UNAVAILABLE,
    [grpc.status.DEADLINE_EXCEEDED]: EXIT.TIME_LIMIT,
    [grpc.status.CANCELLED]: EXIT.CANCELLED,
  }[error.code] ?? EXIT.INTERNAL;
  const suffix = notes.length ? ` (${notes.join('; ')})` : '';
  return { text: `error: ${name}: ${error.details}${suffix}`, exit };
}

async function main() {
  const args = parse(process.argv.slice(2));
  const { Pruner, Health } = loadApi();
  const statusTypes = loadStatusTypes();
  const client = new Pruner(args.address, credentials(args));
  try {
    if ((await checkHealth(Health, args)) !== 'SERVING') return EXIT.UNAVAILABLE;
    await inspect(client, args);
    const status = await prune(client, args);
    return status === 'pruned' ? EXIT.OK : EXIT.UNCHANGED;
  } catch (error) {
    if (typeof error.code !== 'number') {
      process.stderr.write(`error: ${error.message}\n`);
      return EXIT.INTERNAL;
    }
    const { text, exit } = describe(error, statusTypes);
    process.stderr.write(`${text}\n`);
    return exit;
  } finally {
    client.close();
  }
}

main().then((code) => {
  process.exitCode = code;
});
