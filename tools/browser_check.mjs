// Manual acceptance check of the shipped workflows in ComfyUI's real front end (not part of CI).
//
// For every UI-format workflow in example_workflows/*.json it opens a headless Chromium on a running
// ComfyUI, loads the graph with the front end's own `app.loadGraphData`, records console errors /
// warnings, page errors, nodes the front end does not know and widget values it changed, converts
// the graph with `app.graphToPrompt` and compares the prompt with the API twin
// example_workflows/api/<name>.json (node ids, class_type, every input: widget values and links).
// Unless --no-run is given it then shrinks the converted prompt to a small test model (loader
// checkpoint, steps, width/height, LoadImage file, Understand max_new_tokens), queues it with
// POST /prompt, and polls /history until it finishes. Exit status 0 only if everything passed.
//
// See tools/README.md for setup. Options (all optional):
//   --url http://127.0.0.1:8188     ComfyUI to test (must have this pack installed)
//   --workflows <dir>               default: ../example_workflows next to this script
//   --only name1,name2              check only these workflows (file names without .json)
//   --checkpoint tbac-tiny/checkpoint   loader choice used for the runs
//   --image <png>                   uploaded and used by every LoadImage for the runs
//   --steps 2 --size 64             sampler steps and width/height for the runs
//   --no-run                        only load/convert/compare; queue nothing
//   --screenshots <dir>             save <name>.png of each loaded graph there
//   --chromium /usr/bin/chromium    browser executable
//   --timeout 600                   seconds allowed per queued prompt
//   --viewport 1600x1000            browser window size (the layout rules are checked at this size)
//   --templates                     also open every workflow from the Templates dialog (as a user does),
//                                   check the layout rules on screen (fitted zoom, note visible, nothing
//                                   under the tab bar / toolbar, thumbnail loaded) and, with
//                                   --screenshots, save templates_dialog.png and <name>.template.png
//   --module tbac_uniimage          the pack's folder name under custom_nodes (its Templates category)
//   --try-missing-model             open text_to_image from the dialog unchanged, press Run with the
//                                   shipped checkpoint name and save missing_model_run.png (what a user
//                                   without the weights sees); prints the message shown
import { createRequire } from "node:module";
import { readFileSync, readdirSync, mkdirSync, existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));

function parseArgs(argv) {
  const opts = {
    url: "http://127.0.0.1:8188",
    workflows: path.join(HERE, "..", "example_workflows"),
    only: null,
    checkpoint: "tbac-tiny/checkpoint",
    image: null,
    steps: 2,
    size: 64,
    run: true,
    screenshots: null,
    chromium: "/usr/bin/chromium",
    timeout: 600,
    viewport: [1600, 1000],
    templates: false,
    module: "tbac_uniimage",
    tryMissingModel: false,
  };
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${key} needs a value`);
      return argv[++i];
    };
    switch (key) {
      case "--url": opts.url = value().replace(/\/$/, ""); break;
      case "--workflows": opts.workflows = value(); break;
      case "--only": opts.only = value().split(",").map((s) => s.trim()).filter(Boolean); break;
      case "--checkpoint": opts.checkpoint = value(); break;
      case "--image": opts.image = value(); break;
      case "--steps": opts.steps = Number(value()); break;
      case "--size": opts.size = Number(value()); break;
      case "--no-run": opts.run = false; break;
      case "--screenshots": opts.screenshots = value(); break;
      case "--chromium": opts.chromium = value(); break;
      case "--timeout": opts.timeout = Number(value()); break;
      case "--viewport": opts.viewport = value().split("x").map(Number); break;
      case "--templates": opts.templates = true; break;
      case "--module": opts.module = value(); break;
      case "--try-missing-model": opts.tryMissingModel = true; break;
      default: throw new Error(`unknown option ${key} (see the header of ${path.basename(fileURLToPath(import.meta.url))})`);
    }
  }
  return opts;
}

// playwright-core is installed in a scratch folder outside the repo (see README): resolve it from
// the current directory (or NODE_PATH), not from this file's location.
function loadPlaywright() {
  const require = createRequire(path.join(process.cwd(), "noop.js"));
  try {
    return require("playwright-core");
  } catch (err) {
    throw new Error(
      "playwright-core not found from the current directory. Run this from a folder where " +
        "`npm install playwright-core` was done (or set NODE_PATH to its node_modules).\n" + err.message,
    );
  }
}

// -- comparing prompts -------------------------------------------------------------------------
function same(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}

/** Differences between the front end's prompt and the API twin, one line each. */
function comparePrompts(got, expected) {
  const diffs = [];
  for (const id of Object.keys(expected)) {
    if (!(id in got)) { diffs.push(`node ${id} (${expected[id].class_type}): missing from the converted prompt`); continue; }
    const g = got[id], e = expected[id], where = `node ${id} (${e.class_type})`;
    if (g.class_type !== e.class_type) diffs.push(`${where}: class_type expected ${e.class_type}, got ${g.class_type}`);
    const names = new Set([...Object.keys(e.inputs), ...Object.keys(g.inputs)]);
    for (const name of names) {
      if (!(name in g.inputs)) diffs.push(`${where}: input ${name} expected ${JSON.stringify(e.inputs[name])}, got nothing`);
      else if (!(name in e.inputs)) diffs.push(`${where}: input ${name} not in the twin, got ${JSON.stringify(g.inputs[name])}`);
      else if (!same(g.inputs[name], e.inputs[name]))
        diffs.push(`${where}: input ${name} expected ${JSON.stringify(e.inputs[name])}, got ${JSON.stringify(g.inputs[name])}`);
    }
  }
  for (const id of Object.keys(got))
    if (!(id in expected)) diffs.push(`node ${id} (${got[id].class_type}): in the converted prompt, not in the twin`);
  return diffs;
}

/** The prompt with the small test model and sizes (what tests/test_workflows.py's shrink() does). */
function shrink(prompt, opts, imageName) {
  const out = structuredClone(prompt);
  const set = (node, name, value) => {
    if (name in node.inputs && !Array.isArray(node.inputs[name])) node.inputs[name] = value; // never replace a link
  };
  for (const node of Object.values(out)) {
    if (node.class_type === "TBACModelLoader") set(node, "checkpoint", opts.checkpoint);
    if (node.class_type === "TBACSampler") {
      set(node, "steps", Math.min(opts.steps, node.inputs.steps));
      set(node, "width", opts.size);
      set(node, "height", opts.size);
    }
    if (node.class_type === "TBACUnderstand") set(node, "max_new_tokens", 4);
    if (node.class_type === "LoadImage" && imageName) set(node, "image", imageName);
  }
  return out;
}

// -- server ------------------------------------------------------------------------------------
async function uploadImage(opts) {
  const form = new FormData();
  const name = "tbac_browser_check.png";
  form.append("image", new Blob([readFileSync(opts.image)], { type: "image/png" }), name);
  form.append("overwrite", "true");
  const res = await fetch(`${opts.url}/upload/image`, { method: "POST", body: form });
  if (!res.ok) throw new Error(`upload of ${opts.image} failed: ${res.status} ${await res.text()}`);
  const body = await res.json();
  return body.subfolder ? `${body.subfolder}/${body.name}` : body.name;
}

function pngSize(bytes) {
  const view = new DataView(bytes);
  return [view.getUint32(16), view.getUint32(20)];
}

async function runPrompt(prompt, workflow, opts) {
  const res = await fetch(`${opts.url}/prompt`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ prompt, client_id: "tbac-browser-check", extra_data: { extra_pnginfo: { workflow } } }),
  });
  const body = await res.json();
  if (!res.ok || body.error) return { ok: false, detail: `POST /prompt refused: ${JSON.stringify(body.error ?? body)} ${JSON.stringify(body.node_errors ?? {})}` };
  const id = body.prompt_id, start = Date.now();
  while (Date.now() - start < opts.timeout * 1000) {
    await new Promise((r) => setTimeout(r, 1000));
    const entry = (await (await fetch(`${opts.url}/history/${id}`)).json())[id];
    if (!entry || (!entry.status?.completed && entry.status?.status_str !== "error")) continue; // not finished yet
    const seconds = ((Date.now() - start) / 1000).toFixed(1);
    if (entry.status.status_str !== "success") {
      const error = entry.status.messages.find(([kind]) => kind === "execution_error");
      const info = error ? `${error[1].node_type} (node ${error[1].node_id}): ${error[1].exception_type}: ${error[1].exception_message}` : JSON.stringify(entry.status);
      return { ok: false, detail: `failed after ${seconds}s: ${info}` };
    }
    const shown = [];
    for (const [nodeId, out] of Object.entries(entry.outputs)) {
      for (const image of out.images ?? []) {
        const q = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder, type: image.type });
        const [w, h] = pngSize(await (await fetch(`${opts.url}/view?${q}`)).arrayBuffer());
        shown.push(`${nodeId}:${prompt[nodeId].class_type} image ${w}x${h}`);
      }
      for (const text of out.text ?? []) shown.push(`${nodeId}:${prompt[nodeId].class_type} text ${JSON.stringify(String(text).slice(0, 60))}`);
    }
    const missing = Object.entries(prompt)
      .filter(([, n]) => ["SaveImage", "PreviewImage", "PreviewAny"].includes(n.class_type))
      .filter(([nodeId]) => !entry.outputs[nodeId]).map(([nodeId]) => nodeId);
    if (missing.length) return { ok: false, detail: `finished but output nodes ${missing} showed nothing` };
    return { ok: true, detail: `success in ${seconds}s; ${shown.join("; ")}` };
  }
  return { ok: false, detail: `not finished after ${opts.timeout}s (prompt ${id})` };
}

// -- browser -----------------------------------------------------------------------------------
/** Runs in the page: load the graph, report what the front end made of it, convert it. */
async function loadAndConvert(graph) {
  const app = window.app;
  await app.loadGraphData(graph, true, true, null);
  await new Promise((r) => setTimeout(r, 500)); // let widget callbacks / extensions settle
  const registered = window.LiteGraph.registered_node_types;
  const nodes = app.graph.nodes.map((node) => ({
    id: node.id,
    type: node.type,
    known: node.type in registered,
    hasErrors: !!node.has_errors,
    widgets: (node.widgets ?? []).map((w) => [w.name, w.value]),
  }));
  const saved = app.graph.serialize();
  const { output } = await app.graphToPrompt();
  return { nodes, saved, output };
}

/** Visible dialogs and toasts (missing nodes / models, load errors), then close them. */
async function popups(page) {
  const texts = await page.evaluate(() =>
    [...document.querySelectorAll(".p-dialog, .p-toast-message, [role=dialog]")]
      .filter((el) => el.offsetParent !== null)
      .map((el) => el.innerText.replace(/\s+/g, " ").trim().slice(0, 300)),
  );
  for (let i = 0; i < texts.length; i++) await page.keyboard.press("Escape");
  return [...new Set(texts)];
}

/** Widget values the front end changed when it loaded the file (a serialize() round trip). */
function widgetChanges(file, saved) {
  const changes = [];
  const byId = new Map(saved.nodes.map((n) => [n.id, n]));
  for (const node of file.nodes) {
    const back = byId.get(node.id);
    if (!back) { changes.push(`node ${node.id} (${node.type}) vanished`); continue; }
    const a = node.widgets_values ?? [], b = back.widgets_values ?? [];
    if (!same(a, b)) changes.push(`node ${node.id} (${node.type}) widgets_values file ${JSON.stringify(a)} -> front end ${JSON.stringify(b)}`);
  }
  return changes;
}

// -- the Templates dialog --------------------------------------------------------------------------
const MIN_FONT_PX = 9; // LiteGraph's text is NODE_TEXT_SIZE (14) units; below 8 px it stops drawing text

async function openTemplatesCategory(page, opts) {
  const category = page.getByText(opts.module, { exact: true }).first();
  for (let attempt = 0; ; attempt++) {
    await page.keyboard.press("Escape");
    await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
    try { await category.waitFor({ timeout: 15000 }); break; } catch (err) { if (attempt) throw err; }
  }
  await category.click();
  await page.locator(`[data-testid^="template-workflow-"]`).first().waitFor({ timeout: 20000 });
  await page.waitForTimeout(800); // thumbnails
}

/** Opens one template from the dialog and checks what the user sees; returns the problems. */
async function checkTemplate(page, name, opts) {
  const problems = [];
  await openTemplatesCategory(page, opts);
  const card = page.locator(`[data-testid="template-workflow-${name}"]`);
  if (!(await card.count())) return [`no card for ${name} in the Templates dialog (category ${opts.module})`];
  await card.scrollIntoViewIfNeeded();
  await page.waitForTimeout(600); // cards load their image when shown
  const thumb = await card.evaluate((el) => {
    const img = el.querySelector("img");
    return img ? { src: img.getAttribute("src"), width: img.naturalWidth } : null;
  });
  // the front end shows <name>.jpg through a blob: URL; our thumbnails are 256 px wide (the stand-in gradient is not)
  if (!thumb || thumb.width !== 256)
    problems.push(`thumbnail ${name}.jpg not shown (${thumb ? `${thumb.src}, ${thumb.width} px wide` : "no <img>"})`);
  if (opts.screenshots && name === opts.firstName) await page.screenshot({ path: path.join(opts.screenshots, "templates_dialog.png") });
  await card.click();
  await page.waitForTimeout(2500);
  const seen = await page.evaluate(() => {
    const canvas = window.app.canvas, { scale, offset } = canvas.ds;
    const toScreen = ([x, y]) => [(x + offset[0]) * scale, (y + offset[1]) * scale];
    const canvasRect = canvas.canvas.getBoundingClientRect();
    const covered = [];
    const nodes = window.app.graph.nodes.map((node) => {
      const [x0, y0] = toScreen([node.pos[0], node.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT]);
      const [x1, y1] = toScreen([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
      const rect = [x0 + canvasRect.left, y0 + canvasRect.top, x1 + canvasRect.left, y1 + canvasRect.top];
      // probe the title bar and the corners: the topmost element must be the canvas or the node's own DOM widget
      const probes = [[0.5, 0.5 * 30], [0.1, 15], [0.9, 15]].map(([fx, dy]) => [rect[0] + fx * (rect[2] - rect[0]), rect[1] + dy * scale]);
      probes.push([rect[0] + 4, rect[3] - 4], [rect[2] - 4, rect[3] - 4]);
      for (const [px, py] of probes) {
        if (px < 0 || py < 0 || px >= innerWidth || py >= innerHeight) { covered.push(`node ${node.id} (${node.type}) is outside the window at ${px.toFixed(0)},${py.toFixed(0)}`); continue; }
        const el = document.elementFromPoint(px, py);
        if (el && el !== canvas.canvas && !el.closest(".dom-widget") && el.tagName !== "TEXTAREA")
          covered.push(`node ${node.id} (${node.type}) at ${px.toFixed(0)},${py.toFixed(0)} is under <${el.tagName.toLowerCase()} class="${String(el.className).slice(0, 60)}">`);
      }
      return { id: node.id, type: node.type, rect, size: [...node.size] };
    });
    return { scale, lowQuality: canvas.low_quality, nodes, covered, canvas: [canvasRect.width, canvasRect.height] };
  });
  const fontPx = 14 * seen.scale;
  console.log(`  ${name}: fitted zoom ${(seen.scale * 100).toFixed(1)} % (text ${fontPx.toFixed(1)} px), canvas ${seen.canvas.map(Math.round).join("x")}`);
  if (seen.lowQuality) problems.push(`drawn in low quality at ${(seen.scale * 100).toFixed(1)} % (text not drawn)`);
  if (fontPx < MIN_FONT_PX) problems.push(`text ${fontPx.toFixed(1)} px at the fitted zoom, below ${MIN_FONT_PX} px`);
  problems.push(...seen.covered);
  // the front end enlarges a node whose saved size is below what its widgets need (computeSize): the layout
  // (tools/layout_workflows.py) then no longer holds, so any change of size counts
  const file = JSON.parse(readFileSync(path.join(opts.workflows, `${name}.json`), "utf8"));
  for (const node of seen.nodes) {
    const saved = file.nodes.find((n) => n.id === node.id)?.size;
    if (saved && (Math.abs(saved[0] - node.size[0]) > 0.5 || Math.abs(saved[1] - node.size[1]) > 0.5))
      problems.push(`node ${node.id} (${node.type}) shown at ${node.size.map(Math.round).join("x")}, saved as ${saved.join("x")}`);
  }
  if (opts.screenshots) await page.screenshot({ path: path.join(opts.screenshots, `${name}.template.png`) });
  return problems;
}

/** Opens text_to_image from the dialog as shipped and presses Run: what does a user without the weights see? */
async function tryMissingModel(page, opts) {
  await openTemplatesCategory(page, opts);
  await page.locator(`[data-testid="template-workflow-text_to_image"]`).click();
  await page.waitForTimeout(2000);
  const shown = await popups(page); // anything shown on opening (e.g. a missing-models notice)
  await page.evaluate(() => window.app.queuePrompt(0, 1));
  await page.waitForTimeout(3000);
  if (opts.screenshots) await page.screenshot({ path: path.join(opts.screenshots, "missing_model_run.png") });
  const texts = await page.evaluate(() => [...document.querySelectorAll(".p-dialog, .p-toast-message, [role=dialog], [role=alert], .comfy-error-report")]
    .filter((el) => el.offsetParent !== null).map((el) => el.innerText.replace(/\s+/g, " ").trim().slice(0, 600)));
  return JSON.stringify({ onOpen: shown, afterRun: texts });
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const { chromium } = loadPlaywright();
  let names = readdirSync(opts.workflows).filter((f) => f.endsWith(".json")).map((f) => f.slice(0, -5)).sort();
  if (opts.only) names = names.filter((n) => opts.only.includes(n));
  if (!names.length) throw new Error(`no workflows to check in ${opts.workflows}`);
  if (opts.run && !opts.image) throw new Error("--image <png> is needed for the runs (or pass --no-run)");
  if (opts.screenshots) mkdirSync(opts.screenshots, { recursive: true });
  opts.firstName = names[0];

  const browser = await chromium.launch({
    executablePath: opts.chromium,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
  const page = await browser.newPage({ viewport: { width: opts.viewport[0], height: opts.viewport[1] } });
  let log = [];
  page.on("console", (msg) => {
    if (msg.type() === "error" || msg.type() === "warning") log.push(`console.${msg.type()}: ${msg.text().slice(0, 400)}`);
  });
  page.on("pageerror", (err) => log.push(`pageerror: ${err.message.slice(0, 400)}`));
  page.on("requestfailed", (req) => log.push(`requestfailed: ${req.url()} ${req.failure()?.errorText}`));

  await page.goto(opts.url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && typeof window.app.loadGraphData === "function"
    && typeof window.app.graphToPrompt === "function", null, { timeout: 120000 });
  await page.waitForTimeout(2000);
  const startup = log;
  const startupPopups = await popups(page);
  const version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  console.log(`front end ${version ?? "(version unknown)"} at ${opts.url}`);
  for (const line of startup) console.log(`  startup ${line}`);
  for (const text of startupPopups) console.log(`  startup popup: ${text}`);

  const imageName = opts.run ? await uploadImage(opts) : null;
  let failures = 0;
  for (const name of names) {
    const problems = [];
    const file = JSON.parse(readFileSync(path.join(opts.workflows, `${name}.json`), "utf8"));
    const twinPath = path.join(opts.workflows, "api", `${name}.json`);
    log = [];
    const result = await page.evaluate(loadAndConvert, file);
    const shownPopups = await popups(page);
    const loadLog = log;

    for (const n of result.nodes) {
      if (!n.known) problems.push(`node ${n.id}: type ${n.type} is not registered in the front end (missing node)`);
      if (n.hasErrors) problems.push(`node ${n.id} (${n.type}) is flagged has_errors`);
    }
    problems.push(...widgetChanges(file, result.saved).map((c) => `round trip: ${c}`));
    if (!existsSync(twinPath)) problems.push(`no API twin ${twinPath}`);
    else {
      const twin = JSON.parse(readFileSync(twinPath, "utf8"));
      problems.push(...comparePrompts(result.output, twin).map((d) => `prompt differs: ${d}`));
    }
    problems.push(...loadLog.map((l) => `while loading: ${l}`));
    problems.push(...shownPopups.map((t) => `popup while loading: ${t}`));

    if (opts.screenshots) {
      // Fit the graph, but stay above LiteGraph's low-quality zoom (below it nodes render as blank boxes).
      await page.evaluate(async () => {
        await window.app.extensionManager?.command?.execute?.("Comfy.Canvas.FitView");
        const canvas = window.app.canvas;
        if (canvas.ds.scale < 0.75) canvas.ds.changeScale(0.75, [0, 0]);
        canvas.setDirty(true, true);
      });
      await page.waitForTimeout(800);
      await page.screenshot({ path: path.join(opts.screenshots, `${name}.png`) });
    }

    let run = null;
    if (opts.run) {
      run = await runPrompt(shrink(result.output, opts, imageName), result.saved, opts);
      if (!run.ok) problems.push(`run: ${run.detail}`);
    }
    failures += problems.length ? 1 : 0;
    console.log(`\n${problems.length ? "FAIL" : "ok  "} ${name}: ${result.nodes.length} nodes, ${Object.keys(result.output).length} in the prompt`);
    for (const p of problems) console.log(`  - ${p}`);
    if (run?.ok) console.log(`  run: ${run.detail}`);
  }
  if (opts.templates) {
    console.log(`\nTemplates dialog at ${opts.viewport.join("x")}:`);
    for (const name of names) {
      const problems = await checkTemplate(page, name, opts);
      failures += problems.length ? 1 : 0;
      console.log(`${problems.length ? "FAIL" : "ok  "} template ${name}`);
      for (const p of problems) console.log(`  - ${p}`);
    }
  }
  if (opts.tryMissingModel) console.log(`\nmissing model run: ${await tryMissingModel(page, opts)}`);
  await browser.close();
  console.log(`\n${names.length - failures}/${names.length} workflows passed`);
  process.exit(failures ? 1 : 0);
}

main().catch((err) => {
  console.error(err.stack ?? String(err));
  process.exit(2);
});
