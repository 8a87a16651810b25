'use strict';
// Tiny helpers shared by the example clients: `--name value` options and JSON output.

function parseArgs(argv, defaults) {
  const opts = { ...defaults };
  const positionals = [];
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (arg.startsWith('--')) {
      const name = arg.slice(2);
      if (!(name in defaults)) {
        console.error(`unknown option ${arg} (known: ${Object.keys(defaults).map((k) => `--${k}`).join(', ')})`);
        process.exit(2);
      }
      if (i + 1 >= argv.length) {
        console.error(`option ${arg} needs a value`);
        process.exit(2);
      }
      opts[name] = argv[i + 1];
      i += 1;
    } else {
      positionals.push(arg);
    }
  }
  return { opts, positionals };
}

function printResponse(res) {
  const chunks = [];
  res.on('data', (c) => chunks.push(c));
  res.on('end', () => {
    process.stdout.write(`${JSON.stringify({
      status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString('utf8'),
    })}\n`);
  });
}

module.exports = { parseArgs, printResponse };
