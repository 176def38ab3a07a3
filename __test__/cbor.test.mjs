// keel's value encoding in TypeScript: text strings are written in the shortest head at every
// length boundary, and the types JSON cannot carry round-trip exactly (docs/protocol.md).
import { test } from "node:test";
import assert from "node:assert/strict";
import { decode, encode } from "../dist/cbor.js";

/** A text string as RFC 8949 writes it: the shortest head, then the UTF-8 bytes. */
function textItem(text) {
  const bytes = Buffer.from(text, "utf8");
  const n = bytes.length;
  const head =
    n < 24 ? [0x60 | n] : n < 0x100 ? [0x78, n] : n < 0x10000 ? [0x79, n >> 8, n & 0xff] : [0x7a, n >>> 24, (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff];
  return Buffer.concat([Buffer.from(head), bytes]);
}

test("text strings get the shortest head at every length boundary, multi-byte or not", () => {
  const texts = ["", "a", "x".repeat(23), "x".repeat(24), "é".repeat(12), "€".repeat(8), "€".repeat(85), "€".repeat(86)];
  texts.push("x".repeat(255), "x".repeat(256), "😀".repeat(100), "x".repeat(0xffff), "x".repeat(0x10000));
  texts.push("€".repeat(21845), "€".repeat(21846), "a lone \ud800 surrogate", "nul \u0000 and more");
  for (const text of texts) {
    assert.deepEqual(Buffer.from(encode(text)), textItem(text), `a string of ${text.length} units`);
    const nested = { [text]: [text, { text }] };
    assert.deepEqual(Buffer.from(encode(nested)).includes(textItem(text)), true);
  }
  assert.equal(decode(encode("a lone \ud800 surrogate")), "a lone \ufffd surrogate", "as TextEncoder writes it");
});

test("the types JSON cannot carry round-trip exactly", () => {
  const value = {
    date: new Date(1700000000123),
    big: [5n, -5n, 2n ** 70n],
    map: new Map([[1, "a"], ["k", new Set([1, "x"])]]),
    bytes: new Uint8Array([0, 1, 255]),
    missing: undefined,
    negativeZero: -0,
  };
  const back = decode(encode(value));
  assert.deepEqual(back, value);
  assert.ok(Object.is(back.negativeZero, -0));
  assert.ok(back.map instanceof Map && back.map.get("k") instanceof Set);
  assert.ok(back.bytes instanceof Uint8Array);
});
