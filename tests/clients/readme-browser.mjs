// Opens an HTML page (the README's browser example) in headless Chromium
// and prints what it wrote into #out once it has written `lines` lines.
//
//   node tests/clients/readme-browser.mjs FILE.html LINES
import { chromium } from 'playwright-core';

const [file, lines] = process.argv.slice(2);
const fail = (why) => { console.error(`FAIL: ${why}`); process.exit(1); };
setTimeout(() => fail('timed out after 30 s'), 30000).unref();
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
});
try {
  const page = await browser.newPage();
  page.on('pageerror', (e) => fail(`page error: ${e.message}`));
  await page.goto(`file://${file}`);
  await page.waitForFunction(
    (n) => document.getElementById('out').textContent.split('\n').filter(Boolean).length >= n,
    Number(lines),
    { timeout: 20000 },
  );
  process.stdout.write(await page.textContent('#out'));
} finally {
  await browser.close();
}
process.exit(0);
