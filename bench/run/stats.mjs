// The arithmetic every figure of run.mjs goes through: rounding to three decimals and the
// median over rounds.
//
// What must stay true: round3 keeps a missing figure missing (null or undefined gives null, so
// the JSON says null rather than NaN), and the median of an even count is the mean of the
// two middle values. Changing either changes every table and latest.json.



export const round3 = (x) => (x === null || x === undefined ? null : Math.round(x * 1000) / 1000);

export const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
};
