// The demo page in headless Chromium, driven by playwright-core, on two
// gateway nodes: three readers, two on no01 (one per node) and one on
// no02; a line published to no01 shows on exactly the first two, and each
// page shows who else reads its paper, live. Saves screenshots for a
// person to look at.
//
//   node tests/clients/browser.mjs http://NODE1 http://NODE2 OUTPUT_DIR [PAPER_PREFIX]
import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';

const [base1, base2, outDir, prefix = ''] = process.argv.slice(2);
if (!base1 || !base2 || !outDir) {
  console.error('usage: browser.mjs NODE1_HTTP_URL NODE2_HTTP_URL OUTPUT_DIR [PAPER_PREFIX]');
  process.exit(2);
}
const no01 = `${prefix}no01`;
const no02 = `${prefix}no02`;
mkdirSync(outDir, { recursive: true });
const fail = (why) => { console.error(`FAIL: ${why}`); process.exit(1); };
setTimeout(() => fail('timed out after 60 s'), 60000).unref();

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  const open = async (base, paper) => {
    const page = await context.newPage();
    page.on('pageerror', (e) => fail(`page error: ${e.message}`));
    // Everything the page asks for is there (a favicon included).
    page.on('response', (r) => { if (r.status() >= 400) fail(`${r.url()}: HTTP ${r.status()}`); });
    page.on('requestfailed', (r) => fail(`${r.url()}: ${r.failure()?.errorText}`));
    await page.goto(base);
    await page.waitForSelector('#state.connected', { timeout: 15000 });
    await page.fill('#paper', paper);
    await page.click('#subscribe');
    // The chip turns "confirmed" on the SUBSCRIBE's RECEIPT: bound in RabbitMQ.
    await page.waitForSelector(`.chip.confirmed[data-paper="${paper}"]`, { timeout: 15000 });
    return page;
  };
  const reader1 = await open(base1, no01);
  const reader2 = await open(base2, no01);
  const reader3 = await open(base1, no02);
  const sessions = await Promise.all([reader1, reader2, reader3].map((p) => p.textContent('#session')));
  if (new Set(sessions).size !== 3) fail(`sessions not distinct: ${sessions}`);

  const line = `조간 1면 ${Date.now()}`;
  await reader3.fill('#publish-paper', no01);
  await reader3.fill('#line', line);
  await reader3.click('#publish');
  await reader3.waitForSelector('#receipt[data-routed="true"]', { timeout: 15000 });
  for (const page of [reader1, reader2]) {
    await page.waitForSelector(`#messages li[data-channel="${no01}"] >> text=${line}`, { timeout: 15000 });
  }
  // A marker on no02, published after the no01 line, reaches reader 3:
  // had the no01 line reached it too, it would be there already.
  await reader1.fill('#publish-paper', no02);
  await reader1.fill('#line', 'no02 marker');
  await reader1.click('#publish');
  await reader3.waitForSelector(`#messages li[data-channel="${no02}"] >> text=no02 marker`, { timeout: 15000 });
  // Each line names who sent it: reader 3 wrote the no01 line, reader 1
  // the no02 marker.
  const senders = await Promise.all([reader1, reader2, reader3].map((p) =>
    p.$$eval('#messages li[data-channel] .sender', (items) => items.map((i) => i.dataset.sender))));
  const wantSenders = [[sessions[2]], [sessions[2]], [sessions[0]]];
  if (JSON.stringify(senders) !== JSON.stringify(wantSenders)) {
    fail(`senders ${JSON.stringify(senders)}, not ${JSON.stringify(wantSenders)}`);
  }
  const counts = await Promise.all([reader1, reader2, reader3].map((p) =>
    p.$$eval('#messages li[data-channel]', (items) => items.map((i) => i.dataset.channel))));
  const want = [[no01], [no01], [no02]];
  if (JSON.stringify(counts) !== JSON.stringify(want)) fail(`pages show ${JSON.stringify(counts)}`);

  // A line addressed to one reader: reader 1 answers reader 2 alone. A
  // marker then goes to reader 3's inbox: had the line reached reader 3,
  // it would have come first.
  await reader1.fill('#to-session', sessions[1]);
  await reader1.fill('#line', 'just for reader 2');
  await reader1.click('#publish');
  await reader2.waitForSelector('#messages li[data-channel="inbox"] >> text=just for reader 2', { timeout: 15000 });
  await reader1.fill('#to-session', sessions[2]);
  await reader1.fill('#line', 'inbox marker');
  await reader1.click('#publish');
  await reader3.waitForSelector('#messages li[data-channel="inbox"] >> text=inbox marker', { timeout: 15000 });
  const inboxes = await Promise.all([reader1, reader2, reader3].map((p) =>
    p.$$eval('#messages li[data-channel="inbox"] .body', (items) => items.map((i) => i.textContent))));
  const wantInboxes = [[], ['just for reader 2'], ['inbox marker']];
  if (JSON.stringify(inboxes) !== JSON.stringify(wantInboxes)) fail(`inboxes ${JSON.stringify(inboxes)}`);

  // Who reads: each no01 page lists both no01 readers, across the two
  // nodes; the no02 page its reader alone.
  const who = async (page, paper, session) =>
    page.waitForSelector(`#readers li[data-paper="${paper}"] .reader[data-session="${session}"]`, { timeout: 15000 });
  for (const page of [reader1, reader2]) {
    for (const session of sessions.slice(0, 2)) await who(page, no01, session);
  }
  await who(reader3, no02, sessions[2]);
  const listed = await Promise.all([reader1, reader2, reader3].map((p) =>
    p.$$eval('#readers .reader', (items) => items.map((i) => i.dataset.session).sort())));
  const wantListed = [sessions.slice(0, 2).sort(), sessions.slice(0, 2).sort(), [sessions[2]]];
  if (JSON.stringify(listed) !== JSON.stringify(wantListed)) {
    fail(`readers shown ${JSON.stringify(listed)}, not ${JSON.stringify(wantListed)}`);
  }
  await reader1.screenshot({ path: `${outDir}/demo-reader1-no01.png` });
  await reader2.screenshot({ path: `${outDir}/demo-reader2-inbox.png` });
  await reader3.screenshot({ path: `${outDir}/demo-reader3-no02.png` });
  // Reader 2 closes its tab on the other node: it leaves reader 1's list.
  await reader2.close();
  await reader1.waitForSelector(`#readers .reader[data-session="${sessions[1]}"]`, { state: 'detached', timeout: 15000 });
  console.log(JSON.stringify({ client: 'chromium', sessions, shown: counts, readers: listed, screenshots: outDir }));
} finally {
  await browser.close();
}
process.exit(0);
