// A strict reader of the Prometheus text exposition format (version 0.0.4) for the tests: it
// throws on anything the format does not allow, and checks keel's conventions (HELP and TYPE
// once per family, counters named *_total, histograms consistent).
import assert from "node:assert/strict";

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const NUMBER = /^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$/;

function parseValue(text) {
  if (text === "+Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  if (text === "NaN") return NaN;
  assert.match(text, NUMBER, `not a number: ${JSON.stringify(text)}`);
  return Number(text);
}

function parseLabels(text, at) {
  const labels = {};
  let i = at + 1;
  for (;;) {
    if (text[i] === "}") return { labels, next: i + 1 };
    const eq = text.indexOf("=", i);
    assert.ok(eq > i, `a label needs = in ${text}`);
    const name = text.slice(i, eq);
    assert.match(name, LABEL_NAME, `bad label name in ${text}`);
    assert.ok(!name.startsWith("__"), `reserved label name in ${text}`);
    assert.equal(text[eq + 1], '"', `label values are quoted: ${text}`);
    let value = "";
    i = eq + 2;
    for (;;) {
      const c = text[i];
      assert.ok(c !== undefined, `unterminated label value in ${text}`);
      if (c === '"') break;
      if (c === "\\") {
        const escaped = text[i + 1];
        assert.ok(escaped === "\\" || escaped === '"' || escaped === "n", `bad escape in ${text}`);
        value += escaped === "n" ? "\n" : escaped;
        i += 2;
        continue;
      }
      value += c;
      i += 1;
    }
    assert.ok(!(name in labels), `label ${name} repeated in ${text}`);
    labels[name] = value;
    i += 1;
    if (text[i] === ",") i += 1;
    else assert.equal(text[i], "}", `labels are separated by commas: ${text}`);
  }
}

function checkHistogram(name, family) {
  const groups = new Map();
  for (const sample of family.samples) {
    const { le, ...rest } = sample.labels;
    const key = JSON.stringify(Object.entries(rest).sort());
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(sample);
  }
  for (const samples of groups.values()) {
    const buckets = samples.filter((s) => s.name === `${name}_bucket`).map((s) => [parseValue(s.labels.le), s.value]);
    assert.ok(buckets.length >= 2, `${name} has buckets`);
    for (let i = 1; i < buckets.length; i++) {
      assert.ok(buckets[i - 1][0] < buckets[i][0], `${name}: le ascends`);
      assert.ok(buckets[i - 1][1] <= buckets[i][1], `${name}: buckets are cumulative`);
    }
    assert.equal(buckets.at(-1)[0], Infinity, `${name}: the last bucket is +Inf`);
    const counts = samples.filter((s) => s.name === `${name}_count`);
    const sums = samples.filter((s) => s.name === `${name}_sum`);
    assert.equal(counts.length, 1, `${name} has one _count`);
    assert.equal(sums.length, 1, `${name} has one _sum`);
    assert.equal(buckets.at(-1)[1], counts[0].value, `${name}: +Inf equals _count`);
    assert.ok(Number.isInteger(counts[0].value), `${name}: _count is whole`);
    assert.ok(sums[0].value >= 0, `${name}: _sum is not negative`);
  }
}

/** Parses a page into `Map(familyName => { type, help, samples: [{ name, labels, value }] })`. */
export function parsePrometheus(page) {
  assert.ok(page.endsWith("\n"), "the page ends with a newline");
  const families = new Map();
  const helped = new Set();
  const series = new Set();
  let lastHelp;
  let current;
  for (const line of page.slice(0, -1).split("\n")) {
    assert.notEqual(line, "", "no empty lines");
    if (line.startsWith("# HELP ")) {
      const rest = line.slice(7);
      const space = rest.indexOf(" ");
      const name = rest.slice(0, space);
      assert.match(name, METRIC_NAME);
      assert.ok(space > 0 && rest.length > space + 1, `HELP has a text: ${line}`);
      assert.ok(!helped.has(name), `HELP twice for ${name}`);
      helped.add(name);
      lastHelp = { name, help: rest.slice(space + 1) };
      continue;
    }
    if (line.startsWith("# TYPE ")) {
      const [name, type, ...extra] = line.slice(7).split(" ");
      assert.equal(extra.length, 0, line);
      assert.ok(["counter", "gauge", "histogram", "summary", "untyped"].includes(type), line);
      assert.equal(lastHelp?.name, name, `HELP comes right before TYPE: ${line}`);
      assert.ok(!families.has(name), `TYPE twice for ${name}`);
      if (type === "counter") assert.ok(name.endsWith("_total"), `counters end in _total: ${name}`);
      families.set(name, { type, help: lastHelp.help, samples: [] });
      current = name;
      continue;
    }
    assert.ok(!line.startsWith("#"), `unknown comment: ${line}`);
    const nameEnd = line.search(/[{ ]/);
    assert.ok(nameEnd > 0, `a sample has a value: ${line}`);
    const name = line.slice(0, nameEnd);
    assert.match(name, METRIC_NAME);
    let labels = {};
    let next = nameEnd;
    if (line[nameEnd] === "{") ({ labels, next } = parseLabels(line, nameEnd));
    assert.equal(line[next], " ", `one space before the value: ${line}`);
    const [valueText, timestamp, ...junk] = line.slice(next + 1).split(" ");
    assert.equal(junk.length, 0, line);
    if (timestamp !== undefined) assert.match(timestamp, /^-?\d+$/);
    assert.ok(current !== undefined, `samples follow a TYPE line: ${line}`);
    const family = families.get(current);
    const allowed = family.type === "histogram" ? [`${current}_bucket`, `${current}_sum`, `${current}_count`] : [current];
    assert.ok(allowed.includes(name), `${name} outside its family ${current}`);
    const id = name + JSON.stringify(Object.entries(labels).sort());
    assert.ok(!series.has(id), `series repeated: ${line}`);
    series.add(id);
    family.samples.push({ name, labels, value: parseValue(valueText) });
  }
  for (const [name, family] of families) {
    assert.ok(family.samples.length > 0, `${name} has samples`);
    if (family.type === "histogram") checkHistogram(name, family);
    if (family.type === "counter") for (const s of family.samples) assert.ok(s.value >= 0, name);
  }
  return families;
}

/** One series' value: `sample(families, "keel_actions_total", { outcome: "ok" })`. */
export function sample(families, name, labels = {}) {
  const familyName = families.has(name) ? name : name.replace(/_(bucket|sum|count)$/, "");
  const family = families.get(familyName);
  assert.ok(family, `no family ${familyName}`);
  const wanted = Object.entries(labels);
  const found = family.samples.find(
    (s) => s.name === name && Object.keys(s.labels).length === wanted.length && wanted.every(([k, v]) => s.labels[k] === v),
  );
  assert.ok(found, `no sample ${name}${JSON.stringify(labels)}`);
  return found.value;
}
