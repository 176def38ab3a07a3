// The one configuration of this load-generator child: the JSON run.mjs passes as its first
// argument (see the usage at the top of load.mjs), parsed once when load.mjs starts, and the
// only host anything here connects to.
//
// What must stay true: only load.mjs's process imports this (it reads process.argv), and
// every request and socket of the load generator goes to HOST, 127.0.0.1.



export const config = JSON.parse(process.argv[2]);

export const HOST = "127.0.0.1";
