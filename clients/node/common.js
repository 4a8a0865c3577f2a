// What prune.js and job.js share: the protos loaded at run time from ../../protos
// (nothing generated), the connection options (address, bearer token, TLS), the
// PruneConfig options, the chunked upload, and the one mapping from a gRPC
// status (with its google.rpc details) to a message and an exit code, as
// `onnx-prune` exits (service/errors.py).
'use strict';

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

// A thrown UsageError is a bad command line: exit 2 with its message and the usage line.
class UsageError extends Error {}

// A thrown ExitError ends the program with its message and exit code.
class ExitError extends Error {
  constructor(message, exit) {
    super(message);
    this.exit = exit;
  }
}

const CONNECTION_OPTIONS = {
  address: { type: 'string', default: '127.0.0.1:50051' },
  token: { type: 'string' },
  'token-file': { type: 'string' },
  'tls-ca': { type: 'string' },
};
const CONNECTION_USAGE = '[--address HOST:PORT] [--token TOKEN | --token-file FILE] [--tls-ca CA.pem]';

const PRUNE_OPTIONS = {
  mode: { type: 'string', default: 'zero' },
  tolerance: { type: 'string', default: '0.01' },
  'max-evaluations': { type: 'string' },
  'search-width': { type: 'string' },
};
const PRUNE_USAGE = '[--mode zero|remove|nm] [--tolerance 0.01] [--max-evaluations N] [--search-width K]';

// parseArgs, with its complaints (an unknown option, a missing value) as UsageErrors
function parseCommandLine(argv, options) {
  try {
    return parseArgs({ args: argv, allowPositionals: true, options });
  } catch (e) {
    throw new UsageError(e.message);
  }
}

// The connection's settings; the bearer token from --token-file, --token or ONNX_PRUNER_TOKEN.
function connectionOf(values) {
  let token = values.token ?? process.env.ONNX_PRUNER_TOKEN;
  if (values['token-file']) {
    try {
      token = fs.readFileSync(values['token-file'], 'utf8').trim();
    } catch (e) {
      throw new UsageError(`cannot read --token-file: ${e.message}`);
    }
  }
  return { address: values.address, token, tlsCa: values['tls-ca'] };
}

function positiveInteger(values, name, { max = Infinity } = {}) {
  if (values[name] === undefined) return undefined;
  const n = Number(values[name]);
  if (!Number.isInteger(n) || n < 1 || n > max) {
    const range = max === Infinity ? 'a positive integer' : `an integer in [1, ${max}]`;
    throw new UsageError(`--${name} must be ${range}, got ${values[name]}`);
  }
  return n;
}

// The PruneConfig message of the PRUNE_OPTIONS; unset fields take the server's defaults.
function pruneConfigOf(values) {
  if (!['zero', 'remove', 'nm'].includes(values.mode)) throw new UsageError(`unknown --mode ${values.mode}`);
  const tolerance = Number(values.tolerance);
  if (!Number.isFinite(tolerance) || tolerance < 0) {
    throw new UsageError(`--tolerance must be a number >= 0, got ${values.tolerance}`);
  }
  const config = { mode: `MODE_${values.mode.toUpperCase()}`, tolerance: { value: tolerance, relative: false } };
  const maxEvaluations = positiveInteger(values, 'max-evaluations');
  if (maxEvaluations !== undefined) config.max_evaluations = maxEvaluations;
  // the server checks the range [1, 16] too (INVALID_ARGUMENT naming config.search_width); this is the early word
  const searchWidth = positiveInteger(values, 'search-width', { max: 16 });
  if (searchWidth !== undefined) config.search_width = searchWidth;
  return config;
}

function requireFiles(files) {
  for (const file of files) {
    if (!fs.existsSync(file)) throw new UsageError(`${file} does not exist`);
  }
}

function credentials(connection) {
  return connection.tlsCa ? grpc.credentials.createSsl(fs.readFileSync(connection.tlsCa)) : grpc.credentials.createInsecure();
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

// The PruneRequests of a job: its config, then the model and the .npz eval set in chunks.
function* pruneRequests(config, model, evalset) {
  yield { config };
  yield* chunks(model, (chunk) => ({ model_chunk: chunk }));
  yield* chunks(evalset, (chunk) => ({ eval_npz_chunk: chunk }));
}

// report_json may hold the bare tokens NaN/Infinity (pruner.proto, PruneResult.report_json)
function parseReport(text) {
  try {
    return JSON.parse(text.replace(/([:[,]\s*)(-?Infinity|NaN)(?=\s*[,\]}])/g, '$1null'));
  } catch {
    return null;
  }
}

function eventLine(e) {
  return `[${e.evaluation}/${e.max_evaluations}] ${e.kind.replace('EVENT_KIND_', '').toLowerCase()}: ${e.message}`;
}

// The exit code of a gRPC status code, as service/errors.py's table: RESOURCE_EXHAUSTED is
// "busy" (5) only when it carries a RetryInfo, else an input over a limit (2).
function exitOfStatus(code, { retry = false } = {}) {
  return {
    [grpc.status.INVALID_ARGUMENT]: EXIT.BAD_INPUT,
    [grpc.status.UNAUTHENTICATED]: EXIT.BAD_INPUT,
    [grpc.status.NOT_FOUND]: EXIT.BAD_INPUT, // no job has this id
    [grpc.status.FAILED_PRECONDITION]: EXIT.BAD_INPUT, // e.g. the result of a job that has not succeeded
    [grpc.status.RESOURCE_EXHAUSTED]: retry ? EXIT.BUSY : EXIT.BAD_INPUT,
    [grpc.status.UNAVAILABLE]: EXIT.UNAVAILABLE,
    [grpc.status.DEADLINE_EXCEEDED]: EXIT.TIME_LIMIT,
    [grpc.status.CANCELLED]: EXIT.CANCELLED,
  }[code] ?? EXIT.INTERNAL;
}

function statusName(code) {
  return Object.keys(grpc.status).find((key) => grpc.status[key] === code) ?? String(code);
}

// A failed call's one line (status, message, google.rpc details) and exit code.
function describe(error, statusTypes) {
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
  const suffix = notes.length ? ` (${notes.join('; ')})` : '';
  return { text: `error: ${statusName(error.code)}: ${error.details}${suffix}`, exit: exitOfStatus(error.code, { retry }) };
}

// Runs `main` (an async function returning an exit code) and exits with its code; a thrown
// error becomes one line on stderr and its exit code.
function run(main, usageLine) {
  const statusTypes = loadStatusTypes();
  main()
    .catch((error) => {
      if (error instanceof UsageError) {
        process.stderr.write(`error: ${error.message}\nusage: ${usageLine}\n`);
        return EXIT.BAD_INPUT;
      }
      if (error instanceof ExitError) {
        process.stderr.write(`error: ${error.message}\n`);
        return error.exit;
      }
      if (typeof error.code === 'number') {
        const { text, exit } = describe(error, statusTypes);
        process.stderr.write(`${text}\n`);
        return exit;
      }
      process.stderr.write(`error: ${error.message}\n`);
      return EXIT.INTERNAL;
    })
    .then((code) => {
      process.exitCode = code;
    });
}

module.exports = {
  CHUNK_BYTES,
  CONNECTION_OPTIONS,
  CONNECTION_USAGE,
  EXIT,
  ExitError,
  PRUNE_OPTIONS,
  PRUNE_USAGE,
  SERVICE,
  UsageError,
  chunks,
  connectionOf,
  credentials,
  deadline,
  describe,
  eventLine,
  exitOfStatus,
  loadApi,
  loadStatusTypes,
  metadata,
  parseCommandLine,
  parseReport,
  pruneConfigOf,
  pruneRequests,
  requireFiles,
  run,
  send,
  statusName,
};
