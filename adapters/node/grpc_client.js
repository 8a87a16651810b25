#!/usr/bin/env node
// Call a mesh service over gRPC through the meshlib shim's named upstream listener
// (docs/shim.md, "gRPC upstreams"): the shim runs with `--upstream orders=15101`, and any
// stub pointed at 127.0.0.1:15101 reaches `orders` through the mesh (balancing, A6 retries,
// deadlines, breakers, metrics, traces), whatever its services and methods.
//
//   node grpc_client.js [--target 127.0.0.1:15101] [--proto FILE] [--timeout SECONDS]
//        [--metadata '{"key":"value"}'] package.Service/Method ['{"request":"json"}']
//
// Uses @grpc/grpc-js with the .proto loaded at run time (@grpc/proto-loader). For a
// request-streaming method pass a JSON array of requests. Prints one JSON line:
// {"code": 0, "responses": [...], "initial": {...}, "trailers": {...}} or, for a failed call,
// {"code": N, "name": "NOT_FOUND", "details": "...", "trailers": {...}}; exits 0 when the call
// succeeded, 3 when it ended with an error status.
'use strict';
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { parseArgs } = require('./lib/args');

const { opts, positionals } = parseArgs(process.argv.slice(2), {
  target: process.env.MESHLIB_GRPC_UPSTREAM || '127.0.0.1:15101',
  proto: path.join(__dirname, '..', '..', 'tests', 'grpc_proto', 'meshtest.proto'),
  timeout: null,
  metadata: '{}',
});
const [fullMethod, requestJson = '{}'] = positionals;
const match = /^\/?([\w.]+)\/(\w+)$/.exec(fullMethod || '');
if (!match) {
  console.error('usage: grpc_client.js [--target H:P] [--proto FILE] [--timeout S] [--metadata JSON] package.Service/Method [REQUEST_JSON]');
  process.exit(2);
}
const [, serviceName, methodName] = match;

const definition = protoLoader.loadSync(opts.proto, {
  keepCase: true, longs: String, enums: String, bytes: String, defaults: false, oneofs: true,
});
const serviceDef = definition[serviceName];
if (!serviceDef || !serviceDef[methodName]) {
  console.error(`${opts.proto}: no method ${serviceName}/${methodName}`);
  process.exit(2);
}
const method = serviceDef[methodName];
const Client = grpc.makeGenericClientConstructor(serviceDef, serviceName);
const client = new Client(opts.target, grpc.credentials.createInsecure(), {
  'grpc.max_receive_message_length': -1,
  'grpc.max_send_message_length': -1,
});

const metadata = new grpc.Metadata();
for (const [key, value] of Object.entries(JSON.parse(opts.metadata))) {
  metadata.set(key, key.endsWith('-bin') ? Buffer.from(value, 'base64') : value);
}
const callOptions = {};
if (opts.timeout !== null) callOptions.deadline = new Date(Date.now() + Number(opts.timeout) * 1000);

const request = JSON.parse(requestJson);
const responses = [];
let initial = {};

function metadataJson(md) {
  const out = {};
  for (const [key, values] of Object.entries(md ? md.getMap() : {})) {
    out[key] = Buffer.isBuffer(values) ? values.toString('base64') : values;
  }
  return out;
}

function finish(status) {
  const codeName = Object.keys(grpc.status).find((k) => grpc.status[k] === status.code);
  const out = { code: status.code, name: codeName, details: status.details,
    responses, initial, trailers: metadataJson(status.metadata) };
  process.stdout.write(`${JSON.stringify(out)}\n`);
  client.close();
  process.exitCode = status.code === grpc.status.OK ? 0 : 3;
}

let call;
const path_ = method.path;
const ser = method.requestSerialize;
const deser = method.responseDeserialize;
if (!method.requestStream && !method.responseStream) {
  call = client.makeUnaryRequest(path_, ser, deser, request, metadata, callOptions,
    (err, value) => { if (!err) responses.push(value); });
} else if (!method.requestStream) {
  call = client.makeServerStreamRequest(path_, ser, deser, request, metadata, callOptions);
} else if (!method.responseStream) {
  call = client.makeClientStreamRequest(path_, ser, deser, metadata, callOptions,
    (err, value) => { if (!err) responses.push(value); });
} else {
  call = client.makeBidiStreamRequest(path_, ser, deser, metadata, callOptions);
}
if (method.responseStream) {
  call.on('data', (value) => responses.push(value));
  call.on('error', () => {});  // the status event below reports it
}
call.on('metadata', (md) => { initial = metadataJson(md); });
call.on('status', finish);
if (method.requestStream) {
  for (const message of Array.isArray(request) ? request : [request]) call.write(message);
  call.end();
}
