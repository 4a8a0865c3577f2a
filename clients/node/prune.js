#!/usr/bin/env node
// An onnx-pruner client in Node, written from the protos under ../../protos alone
// (loaded at run time, nothing generated). It checks the server's health, lists
// the model's prunable layers (Inspect), prunes the model against an .npz eval
// set (Prune) printing progress, and writes the pruned model. job.js does the
// same work as a durable job (SubmitJob, WatchJob, DownloadResult, ...).
//
//   node prune.js MODEL.onnx EVAL.npz OUT.onnx [--address HOST:PORT] [--token TOKEN]
//       [--token-file FILE] [--tls-ca CA.pem] [--mode zero|remove|nm] [--tolerance 0.01]
//       [--max-evaluations N] [--search-width K] [--report REPORT.json]
//
// The bearer token may also come from ONNX_PRUNER_TOKEN. Exit codes follow
// `onnx-prune`: 0 pruned, 3 unchanged, 2 bad input (INVALID_ARGUMENT,
// UNAUTHENTICATED, an input over a server limit), 4 server unavailable,
// 5 server busy, 6 time limit, 130 cancelled, 1 anything else.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');

const common = require('./common');

const { EXIT, UsageError } = common;
const USAGE = `node prune.js MODEL.onnx EVAL.npz OUT.onnx ${common.CONNECTION_USAGE} ${common.PRUNE_USAGE} ` +
  '[--report REPORT.json]';

function parse(argv) {
  const { values, positionals } = common.parseCommandLine(argv, {
    ...common.CONNECTION_OPTIONS,
    ...common.PRUNE_OPTIONS,
    report: { type: 'string' },
  });
  if (positionals.length !== 3) throw new UsageError('give MODEL.onnx EVAL.npz OUT.onnx');
  const config = common.pruneConfigOf(values);
  const [model, evalset, output] = positionals;
  common.requireFiles([model, evalset]);
  return { connection: common.connectionOf(values), config, model, evalset, output, report: values.report };
}

async function checkHealth(Health, connection) {
  const client = new Health(connection.address, common.credentials(connection));
  try {
    const reply = await new Promise((resolve, reject) =>
      client.Check({ service: common.SERVICE }, { deadline: common.deadline(10) }, (err, res) =>
        (err ? reject(err) : resolve(res))));
    console.log(`health: ${reply.status}`);
    return reply.status;
  } finally {
    client.close();
  }
}

async function inspect(client, args) {
  const reply = await new Promise((resolve, reject) => {
    const call = client.Inspect(common.metadata(args.connection.token), { deadline: common.deadline(120) },
      (err, res) => (err ? reject(err) : resolve(res)));
    common.send(call, common.chunks(args.model, (chunk) => ({ model_chunk: chunk }))).catch(reject);
  });
  console.log(`inspect: ${reply.layers.length} prunable layers, ${reply.prunable_params} of ` +
    `${reply.total_params} parameters prunable, ${reply.skipped.length} weights skipped`);
  return reply;
}

async function prune(client, args) {
  const call = client.Prune(common.metadata(args.connection.token));
  const parts = [];
  let result = null;
  const done = new Promise((resolve, reject) => {
    call.on('data', (response) => {
      if (response.payload === 'progress') {
        console.log(`progress: ${common.eventLine(response.progress)}`);
      } else if (response.payload === 'result') {
        result = response.result;
      } else if (response.payload === 'model_chunk') {
        parts.push(response.model_chunk);
      }
    });
    call.on('error', reject);
    call.on('end', resolve);
  });
  await Promise.all([common.send(call, common.pruneRequests(args.config, args.model, args.evalset)), done]);
  if (result === null) throw new Error('the server ended the call without a result');
  const model = Buffer.concat(parts);
  const digest = crypto.createHash('sha256').update(model).digest('hex');
  if (model.length !== Number(result.model_size) || digest !== result.model_sha256) {
    throw new Error(`the model received (${model.length} bytes, sha256 ${digest}) is not the one announced ` +
      `(${result.model_size} bytes, sha256 ${result.model_sha256})`);
  }
  fs.writeFileSync(args.output, model);
  if (args.report) fs.writeFileSync(args.report, result.report_json);
  const report = common.parseReport(result.report_json);
  const sparsity = report ? ` at sparsity ${(100 * report.sparsity).toFixed(1)}%` : '';
  console.log(`result: ${result.status}${sparsity}; wrote ${args.output} (${model.length} bytes)`);
  return result.status;
}

async function main() {
  const args = parse(process.argv.slice(2));
  const { Pruner, Health } = common.loadApi();
  const client = new Pruner(args.connection.address, common.credentials(args.connection));
  try {
    if ((await checkHealth(Health, args.connection)) !== 'SERVING') return EXIT.UNAVAILABLE;
    await inspect(client, args);
    const status = await prune(client, args);
    return status === 'pruned' ? EXIT.OK : EXIT.UNCHANGED;
  } finally {
    client.close();
  }
}

common.run(main, USAGE);
