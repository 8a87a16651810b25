#!/usr/bin/env node
// Call a mesh service through the meshlib shim used as a forward proxy:
//
//   HTTP_PROXY=http://127.0.0.1:15001 node http_proxy_client.js http://orders/api/orders/42
//
// Node's plain `http` module does not read HTTP_PROXY itself, so this client does what curl,
// Go and Java do with it: connect to the proxy and send the absolute-form request target
// (`GET http://orders/api/orders/42 HTTP/1.1`, RFC 9112 3.2.2). The shim routes by the URL's
// host, a mesh service name. NO_PROXY is honoured for hosts listed in it.
// Prints one JSON line: {"status": ..., "headers": {...}, "body": "..."}.
'use strict';
const http = require('node:http');
const { parseArgs, printResponse } = require('./lib/args');

const { opts, positionals } = parseArgs(process.argv.slice(2), { method: 'GET', data: null });
const target = positionals[0];
if (!target) {
  console.error('usage: HTTP_PROXY=http://127.0.0.1:15001 http_proxy_client.js [--method M] [--data BODY] URL');
  process.exit(2);
}
const url = new URL(target);
const proxyEnv = process.env.HTTP_PROXY || process.env.http_proxy;
const noProxy = (process.env.NO_PROXY || process.env.no_proxy || '').split(',')
  .map((h) => h.trim()).filter(Boolean);
const bypass = noProxy.includes('*') || noProxy.includes(url.hostname);
const body = opts.data === null ? null : Buffer.from(opts.data);
const headers = { Host: url.host };
if (body) headers['Content-Length'] = body.length;

let options;
if (proxyEnv && !bypass) {
  const proxy = new URL(proxyEnv);
  options = { host: proxy.hostname, port: Number(proxy.port || 80), method: opts.method,
    path: url.href, headers };  // absolute form: the proxy reads the destination from it
} else {
  options = { host: url.hostname, port: Number(url.port || 80), method: opts.method,
    path: url.pathname + url.search, headers };
}
const req = http.request(options, (res) => printResponse(res));
req.on('error', (err) => {
  console.error(`${options.host}:${options.port}: ${err.message}`);
  process.exit(1);
});
if (body) req.write(body);
req.end();
