// keel's value encoding: CBOR (RFC 8949) with tags for the JS types JSON cannot carry.
//
// What round-trips exactly: null, undefined, booleans, numbers (including NaN, ±Infinity and
// -0), strings, arrays, plain objects (string keys), Date (tag 1, epoch seconds as a float),
// BigInt (tags 2 and 3), Uint8Array (a byte string; a Buffer comes back as a Uint8Array),
// Map (tag 259 around a map) and Set (tag 258 around an array), nested freely. Anything else
// (functions, symbols, class instances, other typed arrays, cycles) is refused with a
// `TypeError` naming the path to the value, never silently dropped.
//
// Why this is hand-written and not cbor-x: cbor-x's value mapping is not this one, and the
// mapping is a stored format (docs/protocol.md "Value encoding"). Measured with cbor-x 1.6
// (`useRecords: false, mapsAsObjects: true, tagUint8Array: false`): it writes -0 as the
// integer 0 (so -0 comes back as 0) and a BigInt within 64 bits as a plain 64-bit integer
// instead of tag 2/3, and its decoder takes more than core's CBOR walker accepts (indefinite
// lengths, other tags), so client bytes would no longer be refused in exactly one place.
// Matching the tags would take custom extensions around both. cbor-x is faster: on an
// 874-byte state (20 small objects in an array), on the shared 2-core dev machine, cbor-x
// took 6 to 15 us per encode and 11 to 20 us per decode. This encoder took 207 to 239 us
// while it made a new array per string (TextEncoder.encode); it now writes strings into its
// buffer with encodeInto and takes 21 to 39 us. This decoder takes 71 to 121 us.

const TAG_EPOCH_DATE = 1;
const TAG_POSITIVE_BIGNUM = 2;
const TAG_NEGATIVE_BIGNUM = 3;
const TAG_SET = 258;
const TAG_MAP = 259;

const textEncoder = new TextEncoder();
// `ignoreBOM`: a string that starts with U+FEFF keeps it (by default the decoder strips it).
const textDecoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/** Raised for a value keel cannot store or send. */
export class UnsupportedValueError extends TypeError {
  constructor(path: string, what: string) {
    super(`cannot encode ${what} at ${path || "the top level"}: keel stores plain data (see docs/protocol.md)`);
    this.name = "UnsupportedValueError";
  }
}

class Writer {
  private buffer: Uint8Array<ArrayBuffer> = new Uint8Array(256);
  private view = new DataView(this.buffer.buffer);
  length = 0;

  private reserve(extra: number): void {
    if (this.length + extra <= this.buffer.length) return;
    let size = this.buffer.length * 2;
    while (size < this.length + extra) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buffer.subarray(0, this.length));
    this.buffer = next;
    this.view = new DataView(next.buffer);
  }

  byte(value: number): void {
    this.reserve(1);
    this.buffer[this.length++] = value;
  }

  bytes(value: Uint8Array): void {
    this.reserve(value.length);
    this.buffer.set(value, this.length);
    this.length += value.length;
  }

  head(major: number, argument: number | bigint): void {
    const m = major << 5;
    if (typeof argument === "bigint") {
      this.reserve(9);
      this.buffer[this.length++] = m | 27;
      this.view.setBigUint64(this.length, argument);
      this.length += 8;
    } else if (argument < 24) {
      this.byte(m | argument);
    } else if (argument < 0x100) {
      this.reserve(2);
      this.buffer[this.length++] = m | 24;
      this.buffer[this.length++] = argument;
    } else if (argument < 0x10000) {
      this.reserve(3);
      this.buffer[this.length++] = m | 25;
      this.view.setUint16(this.length, argument);
      this.length += 2;
    } else if (argument < 0x100000000) {
      this.reserve(5);
      this.buffer[this.length++] = m | 26;
      this.view.setUint32(this.length, argument);
      this.length += 4;
    } else {
      this.head(major, BigInt(argument));
    }
  }

  /** A text string, encoded straight into the buffer (no intermediate array per string). */
  text(value: string): void {
    // UTF-8 takes at most 3 bytes per UTF-16 unit; leave room for the widest head that
    // length could need, then move the bytes back if the real length needs a shorter one.
    const most = value.length * 3;
    const roomy = headSize(most);
    this.reserve(roomy + most);
    const start = this.length + roomy;
    const { written } = textEncoder.encodeInto(value, this.buffer.subarray(start));
    const size = headSize(written);
    if (size !== roomy) this.buffer.copyWithin(this.length + size, start, start + written);
    this.head(3, written);
    this.length += written;
  }

  float(value: number): void {
    this.reserve(9);
    this.buffer[this.length++] = 0xfb;
    this.view.setFloat64(this.length, value);
    this.length += 8;
  }

  result(): Uint8Array<ArrayBuffer> {
    return this.buffer.slice(0, this.length);
  }
}

/** The bytes of the shortest head for `argument`. */
function headSize(argument: number): number {
  if (argument < 24) return 1;
  if (argument < 0x100) return 2;
  if (argument < 0x10000) return 3;
  if (argument < 0x100000000) return 5;
  return 9;
}

function bigintBytes(value: bigint): Uint8Array {
  if (value === 0n) return new Uint8Array(0);
  let hex = value.toString(16);
  if (hex.length % 2) hex = `0${hex}`;
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(i * 2, i * 2 + 2), 16);
  return out;
}

function isPlainObject(value: object): boolean {
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

function encodeValue(w: Writer, value: unknown, path: string, seen: Set<object>): void {
  switch (typeof value) {
    case "undefined":
      w.byte(0xf7);
      return;
    case "boolean":
      w.byte(value ? 0xf5 : 0xf4);
      return;
    case "number":
      if (Number.isSafeInteger(value) && !Object.is(value, -0)) {
        if (value >= 0) w.head(0, value);
        else w.head(1, -1 - value);
      } else {
        w.float(value);
      }
      return;
    case "bigint": {
      // Always a bignum tag, even when small, so a BigInt comes back as a BigInt.
      const negative = value < 0n;
      w.head(6, negative ? TAG_NEGATIVE_BIGNUM : TAG_POSITIVE_BIGNUM);
      const bytes = bigintBytes(negative ? -1n - value : value);
      w.head(2, bytes.length);
      w.bytes(bytes);
      return;
    }
    case "string":
      w.text(value);
      return;
    case "function":
      throw new UnsupportedValueError(path, "a function");
    case "symbol":
      throw new UnsupportedValueError(path, "a symbol");
  }
  if (value === null) {
    w.byte(0xf6);
    return;
  }
  const object = value as object;
  if (seen.has(object)) throw new UnsupportedValueError(path, "a cycle");
  seen.add(object);
  try {
    if (Array.isArray(object)) {
      w.head(4, object.length);
      for (let i = 0; i < object.length; i++) encodeValue(w, object[i], `${path}[${i}]`, seen);
    } else if (object instanceof Uint8Array) {
      if (object.constructor !== Uint8Array && !(typeof Buffer !== "undefined" && Buffer.isBuffer(object))) {
        throw new UnsupportedValueError(path, `a ${object.constructor.name}`);
      }
      w.head(2, object.length);
      w.bytes(object);
    } else if (object instanceof Date) {
      const time = object.getTime();
      if (Number.isNaN(time)) throw new UnsupportedValueError(path, "an invalid Date");
      w.head(6, TAG_EPOCH_DATE);
      w.float(time / 1000);
    } else if (object instanceof Map) {
      w.head(6, TAG_MAP);
      w.head(5, object.size);
      let i = 0;
      for (const [k, v] of object) {
        encodeValue(w, k, `${path}<key ${i}>`, seen);
        encodeValue(w, v, `${path}<value ${i}>`, seen);
        i++;
      }
    } else if (object instanceof Set) {
      w.head(6, TAG_SET);
      w.head(4, object.size);
      let i = 0;
      for (const item of object) encodeValue(w, item, `${path}<item ${i++}>`, seen);
    } else if (isPlainObject(object)) {
      const keys = Object.keys(object);
      w.head(5, keys.length);
      for (const key of keys) {
        encodeValue(w, key, path, seen);
        encodeValue(w, (object as Record<string, unknown>)[key], path ? `${path}.${key}` : key, seen);
      }
    } else {
      const name = object.constructor?.name ?? "object";
      throw new UnsupportedValueError(path, `an instance of ${name}`);
    }
  } finally {
    seen.delete(object);
  }
}

/** Encodes a value; throws `UnsupportedValueError` for what keel cannot store. */
export function encode(value: unknown): Uint8Array<ArrayBuffer> {
  const w = new Writer();
  encodeValue(w, value, "", new Set());
  return w.result();
}

class Reader {
  pos = 0;
  private readonly view: DataView;
  constructor(private readonly bytes: Uint8Array) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  private need(n: number): void {
    if (this.pos + n > this.bytes.length) throw new TypeError("truncated CBOR");
  }

  argument(info: number): number | bigint {
    if (info < 24) return info;
    switch (info) {
      case 24:
        this.need(1);
        return this.bytes[this.pos++];
      case 25:
        this.need(2);
        this.pos += 2;
        return this.view.getUint16(this.pos - 2);
      case 26:
        this.need(4);
        this.pos += 4;
        return this.view.getUint32(this.pos - 4);
      case 27: {
        this.need(8);
        this.pos += 8;
        const big = this.view.getBigUint64(this.pos - 8);
        return big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
      }
      default:
        throw new TypeError("unsupported CBOR length encoding");
    }
  }

  length(info: number): number {
    const n = this.argument(info);
    if (typeof n === "bigint" || n > this.bytes.length) throw new TypeError("CBOR length exceeds the input");
    return n;
  }

  take(n: number): Uint8Array {
    this.need(n);
    const out = this.bytes.slice(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  value(depth = 0): unknown {
    if (depth > 512) throw new TypeError("CBOR nested too deeply");
    this.need(1);
    const first = this.bytes[this.pos++];
    const major = first >> 5;
    const info = first & 0x1f;
    switch (major) {
      case 0: {
        const n = this.argument(info);
        return n;
      }
      case 1: {
        const n = this.argument(info);
        return typeof n === "bigint" ? -1n - n : -1 - n;
      }
      case 2:
        return this.take(this.length(info));
      case 3:
        return textDecoder.decode(this.take(this.length(info)));
      case 4: {
        const n = this.length(info);
        const out = new Array(n);
        for (let i = 0; i < n; i++) out[i] = this.value(depth + 1);
        return out;
      }
      case 5: {
        const n = this.length(info);
        const out: Record<string, unknown> = {};
        for (let i = 0; i < n; i++) {
          const key = this.value(depth + 1);
          if (typeof key !== "string") throw new TypeError("a CBOR map outside tag 259 needs text keys");
          Object.defineProperty(out, key, { value: this.value(depth + 1), enumerable: true, writable: true, configurable: true });
        }
        return out;
      }
      case 6: {
        const tag = this.argument(info);
        return this.tagged(tag, depth);
      }
      default:
        return this.simple(info);
    }
  }

  private tagged(tag: number | bigint, depth: number): unknown {
    switch (tag) {
      case TAG_EPOCH_DATE: {
        const seconds = this.value(depth + 1);
        if (typeof seconds !== "number") throw new TypeError("tag 1 needs a number");
        return new Date(Math.round(seconds * 1000));
      }
      case TAG_POSITIVE_BIGNUM:
      case TAG_NEGATIVE_BIGNUM: {
        const bytes = this.value(depth + 1);
        if (!(bytes instanceof Uint8Array)) throw new TypeError("a bignum needs a byte string");
        let n = 0n;
        for (const b of bytes) n = (n << 8n) | BigInt(b);
        return tag === TAG_POSITIVE_BIGNUM ? n : -1n - n;
      }
      case TAG_SET: {
        const items = this.value(depth + 1);
        if (!Array.isArray(items)) throw new TypeError("tag 258 needs an array");
        return new Set(items);
      }
      case TAG_MAP: {
        this.need(1);
        const first = this.bytes[this.pos++];
        if (first >> 5 !== 5) throw new TypeError("tag 259 needs a map");
        const n = this.length(first & 0x1f);
        const out = new Map();
        for (let i = 0; i < n; i++) {
          const key = this.value(depth + 1);
          out.set(key, this.value(depth + 1));
        }
        return out;
      }
      default:
        throw new TypeError(`unsupported CBOR tag ${tag}`);
    }
  }

  private simple(info: number): unknown {
    switch (info) {
      case 20:
        return false;
      case 21:
        return true;
      case 22:
        return null;
      case 23:
        return undefined;
      case 25: {
        this.need(2);
        const half = this.view.getUint16(this.pos);
        this.pos += 2;
        return decodeHalf(half);
      }
      case 26:
        this.need(4);
        this.pos += 4;
        return this.view.getFloat32(this.pos - 4);
      case 27:
        this.need(8);
        this.pos += 8;
        return this.view.getFloat64(this.pos - 8);
      default:
        throw new TypeError(`unsupported CBOR simple value ${info}`);
    }
  }
}

function decodeHalf(half: number): number {
  const exponent = (half >> 10) & 0x1f;
  const mantissa = half & 0x3ff;
  const sign = half & 0x8000 ? -1 : 1;
  if (exponent === 0) return sign * 2 ** -14 * (mantissa / 1024);
  if (exponent === 31) return mantissa ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + mantissa / 1024);
}

/** Decodes one CBOR item that fills `bytes`. */
export function decode(bytes: Uint8Array): unknown {
  const reader = new Reader(bytes);
  const value = reader.value();
  if (reader.pos !== bytes.length) throw new TypeError("trailing bytes after the CBOR value");
  return value;
}
