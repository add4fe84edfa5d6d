// Drives Debian's chromium through lensflow's web page, as a person with a keyboard would, on
// both shipped pipelines, and prints what the page showed as one JSON object (tests/serve.rs
// asserts on it).
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

  // What the page shows of the pipeline selected: charts, segments, status.
  const shown = async () => {
    await page.waitForSelector(".serving-mark", { state: "attached", timeout: 15000 });
    await page.waitForSelector("#segments-svg .segment-bar");
    await page.waitForFunction(() => document.querySelectorAll("#status dd").length > 1);
    return {
      serving: await page.textContent("#serving"),
      charts: await page.$$eval("#rounds-charts svg", (svgs) => svgs.map((s) => ({
        title: s.getAttribute("aria-label"), points: s.querySelectorAll(".point").length, servingMarks: s.querySelectorAll(".serving-mark").length }))),
      segmentSizes: await page.$$eval("#segments-svg .segment-bar", (bars) => bars.map((b) => Number(b.dataset.size))),
      segmentTexts: await page.$$eval("#segment-list li", (t) => t.map((x) => x.textContent)),
      profileRows: await page.$$eval("#profile-table tbody tr", (r) => r.length),
      status: Object.fromEntries(await page.$$eval("#status dt", (dts) => dts.map((dt) => [dt.textContent, dt.nextElementSibling.textContent]))),
      fields: await page.$$eval("[data-field]", (cs) => cs.map((c) => ({ field: c.dataset.field, tag: c.tagName.toLowerCase(), type: c.type,
        min: c.min ?? null, max: c.max ?? null, options: c.tagName === "SELECT" ? [...c.options].map((o) => o.value).filter(Boolean) : null,
        suggestions: c.list ? c.list.options.length : 0, label: document.querySelector(`label[for="${c.id}"]`)?.textContent ?? null }))),
    };
  };
  const card = (id) => page.$eval(`#${id}`, (c) => ({ value: c.querySelector(".value").textContent, raw: c.querySelector(".value").dataset.value,
    detail: c.querySelector(".detail").textContent }));
  const answer = async () => ({ classification: await card("ans-classification"), regression: await card("ans-regression"), clustering: await card("ans-clustering") });
  const changed = (before) => page.waitForFunction((b) => document.querySelector("#ans-regression .value").dataset.value !== b, before);

  await page.goto(url);
  out.pipelines = await page.$$eval("#pipeline option", (o) => o.map((x) => x.value));
  out.movielens = await shown();

  // Keyboard only: focus the user field, type, tab to the movie field, type, Enter submits.
  await page.focus("#field-userId");
  await page.keyboard.type("547");
  await page.keyboard.press("Tab");
  await page.keyboard.type("1");
  await page.keyboard.press("Enter");
  await page.waitForSelector("#answers:not([hidden])");
  await page.waitForFunction(() => document.querySelector("#ans-clustering .value").textContent !== "");
  out.movielens.answer = await answer();
  out.movielens.whatIfPrefilled = await page.inputValue("#f-u_mean");
  await page.screenshot({ path: `${shots}/desktop-movielens.png`, fullPage: true });

  // A what-if: a lower movie mean must lower the predicted rating.
  await page.click("#whatif summary");
  await page.fill("#f-m_mean", "1.5");
  await page.press("#field-userId", "Enter");
  await changed(out.movielens.answer.regression.raw);
  out.movielens.whatIf = await card("ans-regression");

  // Errors land next to the field that caused them.
  await page.fill("#field-userId", "-3");
  await page.press("#field-userId", "Enter");
  await page.waitForFunction(() => document.querySelector("#err-userId").textContent !== "");
  out.movielens.userError = { text: await page.textContent("#err-userId"), invalid: await page.getAttribute("#field-userId", "aria-invalid") };
  await page.fill("#field-userId", "547");
  await page.fill("#f-u_mean", "7");
  await page.press("#field-userId", "Enter");
  await page.waitForFunction(() => document.getElementById("err-features.u_mean").textContent !== "");
  out.movielens.featureError = await page.textContent("#err-features\\.u_mean");

  // The other pipeline, chosen with the keyboard: its own form, charts and segments.
  await page.focus("#pipeline");
  await page.selectOption("#pipeline", "smart-home");
  await page.waitForFunction(() => document.querySelector("#serving").textContent.includes("smart-home"));
  out.smartHome = await shown();
  out.smartHome.hash = await page.evaluate(() => location.hash);
  await page.selectOption("#field-DeviceType", "Camera");
  await page.focus("#field-UsageHoursPerDay");
  await page.keyboard.type("10");
  for (const [field, value] of [["EnergyConsumption", "2"], ["UserPreferences", "1"], ["MalfunctionIncidents", "0"], ["DeviceAgeMonths", "20"]]) {
    // Tab goes straight to the next field: hints and error slots take no focus.
    await page.keyboard.press("Tab");
    out.smartHome.tabbedTo = [...(out.smartHome.tabbedTo || []), await page.evaluate(() => document.activeElement.dataset.field)];
    await page.keyboard.type(value);
  }
  await page.keyboard.press("Enter");
  await page.waitForSelector("#answers:not([hidden])");
  await page.waitForFunction(() => document.querySelector("#ans-clustering .value").textContent !== "");
  out.smartHome.answer = await answer();
  await page.screenshot({ path: `${shots}/desktop-smart-home.png`, fullPage: true });
  await page.fill("#field-UsageHoursPerDay", "30");
  await page.press("#field-UsageHoursPerDay", "Enter");
  await page.waitForFunction(() => document.querySelector("#err-UsageHoursPerDay").textContent !== "");
  out.smartHome.hoursError = { text: await page.textContent("#err-UsageHoursPerDay"), invalid: await page.getAttribute("#field-UsageHoursPerDay", "aria-invalid") };
  await page.fill("#field-UsageHoursPerDay", "10");

  // Phone width: nothing wider than the screen, on either pipeline.
  await page.setViewportSize({ width: 390, height: 844 });
  out.phoneOverflow = { smartHome: await page.evaluate(() => document.scrollingElement.scrollWidth - window.innerWidth) };
  await page.screenshot({ path: `${shots}/phone-smart-home.png`, fullPage: true });
  await page.selectOption("#pipeline", "movielens");
  await page.waitForFunction(() => document.querySelector("#serving").textContent.includes("movielens"));
  await page.waitForSelector("#segments-svg .segment-bar");
  out.phoneOverflow.movielens = await page.evaluate(() => document.scrollingElement.scrollWidth - window.innerWidth);
  await page.screenshot({ path: `${shots}/phone-movielens.png`, fullPage: true });
  out.consoleErrors = consoleErrors;
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
