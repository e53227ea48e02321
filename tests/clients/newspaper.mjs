// The newspaper with a real @stomp/stompjs client (over the `ws` package),
// as a web or Node user would write it. Exits 0 when every reader got
// exactly its paper in order, 1 with a reason otherwise.
//
//   node tests/clients/newspaper.mjs ws://127.0.0.1:8080/ws [channel-prefix]
import { Client } from '@stomp/stompjs';
import WebSocket from 'ws';

const [url, prefix = ''] = process.argv.slice(2);
if (!url) {
  console.error('usage: newspaper.mjs WS_URL [CHANNEL_PREFIX]');
  process.exit(2);
}
const no01 = `${prefix}no01`;
const no02 = `${prefix}no02`;
const fail = (why) => { console.error(`FAIL: ${why}`); process.exit(1); };
setTimeout(() => fail('timed out after 20 s'), 20000).unref();

function connect(name) {
  return new Promise((resolve, reject) => {
    const client = new Client({
      webSocketFactory: () => new WebSocket(url, ['v12.stomp', 'v11.stomp', 'v10.stomp']),
      heartbeatIncoming: 1000,
      heartbeatOutgoing: 1000,
      reconnectDelay: 0,
      onConnect: (frame) => resolve({ client, session: frame.headers.session, name }),
      onStompError: (frame) => reject(new Error(`${name}: ERROR ${frame.headers.message}`)),
      onWebSocketError: (e) => reject(new Error(`${name}: WebSocket error ${e.message}`)),
    });
    client.activate();
  });
}

function receipt(client, id) {
  return new Promise((resolve) => client.watchForReceipt(id, resolve));
}

async function subscribe(user, paper, inbox) {
  const id = `sub-${user.name}`;
  const done = receipt(user.client, id);
  user.client.subscribe(`/topic/${paper}`, (m) => inbox.push(m), { id, receipt: id });
  await done;
}

const [user1, user2, user3, publisher] = await Promise.all(
  ['user1', 'user2', 'user3', 'publisher'].map(connect),
);
const until = async (check) => { while (!check()) await new Promise((r) => setTimeout(r, 20)); };
// Who reads no01 (the seed's new and close): a snapshot, then joins and leaves.
const presence = [];
publisher.client.subscribe(`/presence/${no01}`, (m) => presence.push(m), { id: 'who' });
await until(() => presence.length >= 1);
if (presence[0].headers['stompgate-presence'] !== 'snapshot' || JSON.parse(presence[0].body).members.length) {
  fail(`first presence MESSAGE ${JSON.stringify(presence[0].headers)} ${presence[0].body}`);
}
const inbox = { user1: [], user2: [], user3: [] };
await subscribe(user1, no01, inbox.user1);
await subscribe(user2, no01, inbox.user2);
await subscribe(user3, no02, inbox.user3);
await until(() => presence.length >= 3);
const joined = presence.slice(1, 3).map((m) => JSON.parse(m.body));
if (JSON.stringify(joined.map((j) => [j.presence, j.session])) !==
    JSON.stringify([['join', user1.session], ['join', user2.session]])) {
  fail(`presence joins ${JSON.stringify(joined)}`);
}

const issues = ['1면: 구독 시작', 'page 2', 'page 3'];
for (const body of issues) publisher.client.publish({ destination: `/topic/${no01}`, body });
let done = receipt(publisher.client, 'r-no02');
publisher.client.publish({ destination: `/pub/${no02}`, body: 'no02 only', headers: { receipt: 'r-no02' } });
const routed = (await done).headers.routed;
if (routed !== 'true') fail(`RECEIPT for no02 says routed:${routed}`);
done = receipt(publisher.client, 'r-nobody');
publisher.client.publish({ destination: `/topic/${prefix}no99`, body: 'anyone?', headers: { receipt: 'r-nobody' } });
const unrouted = (await done).headers.routed;
if (unrouted !== 'false') fail(`RECEIPT for a channel without readers says routed:${unrouted}`);

await until(() => inbox.user1.length >= 3 && inbox.user2.length >= 3 && inbox.user3.length >= 1);
// The end marker on no02 was confirmed after the no01 issues; one more
// marker on no01 proves no stray no02 message reached its readers.
done = receipt(publisher.client, 'r-end');
publisher.client.publish({ destination: `/topic/${no01}`, body: 'end', headers: { receipt: 'r-end' } });
await done;
await until(() => inbox.user1.length >= 4 && inbox.user2.length >= 4);

for (const name of ['user1', 'user2']) {
  const bodies = inbox[name].map((m) => m.body);
  const want = [...issues, 'end'];
  if (JSON.stringify(bodies) !== JSON.stringify(want)) fail(`${name} got ${JSON.stringify(bodies)}`);
  const dest = inbox[name][0].headers.destination;
  if (dest !== `/topic/${no01}`) fail(`${name} MESSAGE destination ${dest}`);
  // Who sent it, set by the gateway: the publisher's session.
  const senders = inbox[name].map((m) => m.headers['stompgate-sender-session']);
  if (senders.some((s) => s !== publisher.session)) {
    fail(`${name} senders ${JSON.stringify(senders)}, not ${publisher.session}`);
  }
}
if (inbox.user3.length !== 1 || inbox.user3[0].body !== 'no02 only') {
  fail(`user3 got ${JSON.stringify(inbox.user3.map((m) => m.body))}`);
}
// Addressed to one session (the seed's receiver): only user1's inbox.
const direct = [];
done = receipt(user1.client, 'sub-inbox');
user1.client.subscribe('/user/queue/inbox', (m) => direct.push(m), { id: 'inbox', receipt: 'sub-inbox' });
await done;
done = receipt(publisher.client, 'r-direct');
publisher.client.publish({
  destination: `/session/${user1.session}/queue/inbox`, body: 'for user1 only', headers: { receipt: 'r-direct' },
});
const directRouted = (await done).headers.routed;
if (directRouted !== 'true') fail(`RECEIPT for the addressed message says routed:${directRouted}`);
await until(() => direct.length >= 1);
if (direct[0].body !== 'for user1 only' || direct[0].headers.destination !== '/user/queue/inbox') {
  fail(`user1's inbox got ${direct[0].body} on ${direct[0].headers.destination}`);
}
await user2.client.deactivate();
await until(() => presence.length >= 4);
const left = JSON.parse(presence[3].body);
if (left.presence !== 'leave' || left.session !== user2.session || left.reason !== 'disconnect') {
  fail(`presence leave ${presence[3].body}`);
}
await Promise.all([user1, user3, publisher].map((u) => u.client.deactivate()));
console.log(JSON.stringify({
  client: 'stompjs',
  sessions: [user1, user2, user3, publisher].map((u) => u.session),
  user1: inbox.user1.map((m) => m.body),
  user2: inbox.user2.map((m) => m.body),
  user3: inbox.user3.map((m) => m.body),
  receipts: { no02: routed, nobody: unrouted },
  presence: presence.map((m) => m.headers['stompgate-presence']),
}));
process.exit(0);
