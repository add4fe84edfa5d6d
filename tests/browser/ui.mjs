// Drives Debian's chromium through lensflow's web page, as a person with a keyboard would,
// and prints what the page showed as one JSON object (tests/serve.rs asserts on it).
// Usage: node ui.mjs URL SCREENSHOT_DIR
import { chromium } from "playwright-core";

const [url, shots] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // No sandbox as root in CI; no background networking on a machine without internet.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
const out = {};
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  const consoleErrors = [];
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  await page.goto(url);
  await page.waitForSelector(".serving-mark", { state: "attached", timeout: 15000 });
  await page.waitForSelector("#segments-svg .segment-bar");
  await page.waitForFunction(() => document.querySelectorAll("#status dd").length > 1);
  out.serving = await page.textContent("#serving");
  out.charts = await page.$$eval("#rounds-charts svg", (svgs) => svgs.map((s) => ({
    title: s.getAttribute("aria-label"), points: s.querySelectorAll(".point").length, servingMarks: s.querySelectorAll(".serving-mark").length })));
  out.segmentSizes = await page.$$eval("#segments-svg .segment-bar", (bars) => bars.map((b) => Number(b.dataset.size)));
  out.segmentTexts = await page.$$eval("#segment-list li", (t) => t.map((x) => x.textContent));
  out.profileRows = await page.$$eval("#profile-table tbody tr", (r) => r.length);
  out.status = Object.fromEntries(await page.$$eval("#status dt", (dts) => dts.map((dt) => [dt.textContent, dt.nextElementSibling.textContent])));
  out.userSuggestions = await page.$$eval("#user-ids option", (o) => o.length);

  // Keyboard only: focus the user field, type, tab to the movie field, type, Enter submits.
  await page.focus("#userId");
  await page.keyboard.type("547");
  await page.keyboard.press("Tab");
  await page.keyboard.type("1");
  await page.keyboard.press("Enter");
  await page.waitForSelector("#answers:not([hidden])");
  await page.waitForFunction(() => document.querySelector("#ans-clustering .value").textContent !== "");
  const card = (id) => page.$eval(`#${id}`, (c) => ({ value: c.querySelector(".value").textContent, raw: c.querySelector(".value").dataset.value,
    detail: c.querySelector(".detail").textContent }));
  out.answer = { classification: await card("ans-classification"), regression: await card("ans-regression"), clustering: await card("ans-clustering") };
  out.whatIfPrefilled = await page.inputValue("#f-u_mean");
  await page.screenshot({ path: `${shots}/desktop.png`, fullPage: true });

  // A what-if: a lower movie mean must lower the predicted rating.
  await page.click("#whatif summary");
  await page.fill("#f-m_mean", "1.5");
  await page.press("#userId", "Enter");
  await page.waitForFunction((before) => document.querySelector("#ans-regression .value").dataset.value !== before, out.answer.regression.raw);
  out.whatIf = await card("ans-regression");

  // Errors land next to the field that caused them.
  await page.fill("#userId", "-3");
  await page.press("#userId", "Enter");
  await page.waitForFunction(() => document.querySelector("#err-userId").textContent !== "");
  out.userError = { text: await page.textContent("#err-userId"), invalid: await page.getAttribute("#userId", "aria-invalid") };
  await page.fill("#userId", "547");
  await page.fill("#f-u_mean", "7");
  await page.press("#userId", "Enter");
  await page.waitForFunction(() => document.getElementById("err-features.u_mean").textContent !== "");
  out.featureError = await page.textContent("#err-features\\.u_mean");

  // Phone width: nothing wider than the screen.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.fill("#f-u_mean", "");
  out.phoneOverflow = await page.evaluate(() => document.scrollingElement.scrollWidth - window.innerWidth);
  await page.screenshot({ path: `${shots}/phone.png`, fullPage: true });
  out.consoleErrors = consoleErrors;
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
