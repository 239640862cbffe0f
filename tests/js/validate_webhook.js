#!/usr/bin/env node
/*
 * Checks webhook POSTs with the official Pusher server SDK for Node (npm
 * `pusher`): reads a JSON array of {"appId","key","secret","headers","body"}
 * on stdin (headers lower-cased, body the raw text), and writes a JSON array
 * of {"valid": webhook.isValid(), "time_ms": webhook.getTime(), "events":
 * webhook.getEvents()} (null for an invalid one) on stdout.
 */
'use strict';

const Pusher = require('pusher');

let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const answers = JSON.parse(input).map((post) => {
    const pusher = new Pusher({ appId: post.appId, key: post.key, secret: post.secret });
    const webhook = pusher.webhook({ headers: post.headers, rawBody: post.body });
    const valid = webhook.isValid();
    return {
      valid,
      time_ms: valid ? webhook.getTime().getTime() : null,
      events: valid ? webhook.getEvents() : null,
    };
  });
  process.stdout.write(JSON.stringify(answers) + '\n');
});
