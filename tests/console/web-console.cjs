// Drives the web test console (GET /console on the admin listener) in headless Chromium with
// playwright-core: connect to an API, send a message, see the echo, disconnect; then a refused
// handshake shows its HTTP status; then a message policy's drop, replacement and close show in
// the log. Usage: node web-console.cjs ADMIN_URL SCREENSHOT.png [TOKEN]
// With TOKEN (an admin listener that requires one), the page must first ask for it.
// Run by tests/e2e/console.rs; playwright-core comes from target/browser (scripts/test), Chromium
// from Debian (CHROMIUM, default /usr/bin/chromium).
const { chromium } = require("playwright-core");

const [admin, screenshot, token] = process.argv.slice(2);

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  try {
    const page = await browser.newPage();
    await page.goto(`${admin}/console`);
    let askedForToken = false;
    if (token) {
      await page.waitForSelector("body[data-ready='token']", { timeout: 10000 });
      askedForToken = await page.locator("#tokenbox").isVisible();
      await page.fill("#token", token);
      await page.click("#usetoken");
    }
    await page.waitForSelector("body[data-ready='1']", { timeout: 10000 });
    const text = (sel) => page.locator(sel).textContent();

    await page.selectOption("#api", { label: "echo (/echo)" });
    await page.fill("#query", "room=1");
    await page.click("#connect");
    await page.waitForFunction(() => document.getElementById("status").className === "open", null, { timeout: 10000 });
    await page.fill("#payload", "hello from chromium");
    await page.click("#send");
    await page.waitForSelector("#log .received", { timeout: 10000 });
    const received = await text("#log .received");
    await page.check("input[value=binary]");
    await page.fill("#payload", "01 ff 7e");
    await page.click("#send");
    await page.waitForFunction(() => document.querySelectorAll("#log .received").length === 2, null, { timeout: 10000 });
    const receivedBinary = await page.locator("#log .received").nth(1).textContent();
    await page.click("#disconnect");
    await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("closed"), null, { timeout: 10000 });
    const closed = await text("#status");

    await page.selectOption("#api", { label: "locked (/locked)" });
    await page.click("#connect");
    await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("handshake refused"), null, { timeout: 15000 });
    const refused = await text("#status");
    const refusedLog = await text("#log .error:last-child");

    // An API with a message policy (message-test): what it does to each message shows in the
    // log, and the sent message it was about is marked.
    await page.selectOption("#api", { label: "judged (/judged)" });
    await page.fill("#query", "");
    await page.check("input[value=text]");
    await page.click("#connect");
    await page.waitForFunction(() => document.getElementById("status").className === "open", null, { timeout: 10000 });
    for (const m of ["hello", "drop me", "upper:shout"]) {
      await page.fill("#payload", m);
      await page.click("#send");
    }
    await page.waitForFunction(() => document.querySelectorAll("#log .gateway").length >= 2, null, { timeout: 10000 });
    await page.fill("#payload", "close:4000:no more");
    await page.click("#send");
    await page.waitForFunction(
      () => document.getElementById("status").textContent.startsWith("closed") && document.querySelectorAll("#log .gateway").length >= 3,
      null, { timeout: 10000 });
    const gatewayLines = await page.locator("#log .gateway").allTextContents();
    const marked = await page.locator("#log .sent.changed").evaluateAll((els) => els.map((e) => `${e.dataset.happened}: ${e.textContent}`));
    const judgedReceived = await page.locator("#log .received").allTextContents();
    const judgedClosed = await text("#status");
    await page.screenshot({ path: screenshot, fullPage: true });
    console.log(JSON.stringify({ askedForToken, received, receivedBinary, closed, refused, refusedLog,
      gatewayLines, marked, judgedReceived, judgedClosed }));
  } finally {
    await browser.close();
  }
}

main().catch((e) => { console.error(String(e && e.stack || e)); process.exit(1); });
