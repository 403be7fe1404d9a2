// A Node.js client's workload, driven by tests/integration/test_node_clients.py.
//
// Usage: node workload.js mysql2|mariadb|mysql   (TIPROXY_HOST, TIPROXY_PORT, TIPROXY_USER,
// TIPROXY_PASSWORD, TIPROXY_DATABASE in the environment)
//
// Each step's result goes to stdout as a line `R <json>`. Where the test may move the session,
// the script writes `MOVE <connection id>` (or `REDIRECT <id>`) and waits for a line `ok` on
// stdin: through the proxy the test moves the session to its other backend and waits until it
// is there (or only asks for the move, which happens when the next command arrives); directly
// it answers at once. The two runs' `R` lines must be the same.
'use strict';

const crypto = require('crypto');
const readline = require('readline');

const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function ask(what, id) {
  process.stdout.write(`${what} ${id}\n`);
  const { value, done } = await lines.next();
  if (done || value !== 'ok') throw new Error(`the test did not answer ${what}: ${value}`);
}

const move = (id) => ask('MOVE', id); // moved before it returns
const redirect = (id) => ask('REDIRECT', id); // asked to move: it does when its next command comes

function plain(value) {
  // JSON for what the drivers return: BigInt as text, Buffers as hex, result metadata dropped.
  return JSON.parse(JSON.stringify(value, (key, v) => {
    if (typeof v === 'bigint') return `${v}n`;
    if (v && v.type === 'Buffer' && Array.isArray(v.data)) {
      return `0x${Buffer.from(v.data).toString('hex')}`;
    }
    return v;
  }));
}

function out(step, value) {
  process.stdout.write(`R ${JSON.stringify({ step, value: plain(value) })}\n`);
}

function digest(rows) {
  return { count: rows.length, sha1: crypto.createHash('sha1').update(JSON.stringify(plain(rows))).digest('hex') };
}

const options = {
  host: process.env.TIPROXY_HOST || '127.0.0.1',
  port: Number(process.env.TIPROXY_PORT),
  user: process.env.TIPROXY_USER,
  password: process.env.TIPROXY_PASSWORD,
  database: process.env.TIPROXY_DATABASE || 'test',
  multipleStatements: true,
  dateStrings: true,
};

// mysql2: the text protocol (query) and prepared statements (execute) with its own statement
// cache, which keeps using a statement id across the moves.
async function mysql2Workload() {
  const mysql = require('mysql2/promise');
  const conn = await mysql.createConnection({ ...options, supportBigNumbers: true, bigNumberStrings: true });
  const id = conn.threadId;
  const column = (f) => (f ? [f.name, f.columnType, f.flags] : null);
  const shape = ([rows, fields]) => (Array.isArray(rows)
    ? { rows, fields: fields && fields.map((f) => (Array.isArray(f) ? f.map(column) : column(f))) }
    : { affectedRows: rows.affectedRows, insertId: rows.insertId, warningStatus: rows.warningStatus });
  const q = async (step, sql, params) => out(step, shape(await conn.query(sql, params)));
  const x = async (step, sql, params) => out(step, shape(await conn.execute(sql, params)));

  await q('table', 'CREATE OR REPLACE TABLE node_t (id INT PRIMARY KEY, name VARCHAR(40), '
    + 'price DECIMAL(10,2), born DATE, raw BLOB, doc JSON, big BIGINT UNSIGNED)');
  await q('procedure', "CREATE OR REPLACE PROCEDURE node_p() BEGIN SELECT 1 AS a; SELECT 'b' AS b; END");
  await q('variables', "SET @a = 1, @s = 'héllo', @d = 2.5, SESSION sql_mode = 'ANSI_QUOTES', time_zone = '+03:00'");
  for (let i = 1; i <= 5; i += 1) {
    await x(`insert ${i}`, 'INSERT INTO node_t VALUES (?, ?, ?, ?, ?, ?, ?)',
      [i, `n${i}`, `${i}.25`, `2020-01-0${i}`, Buffer.from([0, i, 255]), JSON.stringify({ i }), '18446744073709551615']);
  }
  await x('prepared select', 'SELECT * FROM node_t WHERE id > ? ORDER BY id', [2]);
  await move(id);
  await x('the same statement after a move', 'SELECT * FROM node_t WHERE id > ? ORDER BY id', [3]);
  await x('null and text parameters', 'SELECT ? IS NULL AS n, ? AS s, ? + 1 AS i', [null, 'x', 41]);
  await q('state after a move', 'SELECT @a, @s, @d, @@sql_mode, @@time_zone, DATABASE()');
  await q('multi-statement', 'SELECT 1 AS one; SELECT 2 AS two; UPDATE node_t SET name = name WHERE id = 1');
  await q('procedure results', 'CALL node_p()');
  await conn.beginTransaction();
  await x('in a transaction', 'INSERT INTO node_t (id, name) VALUES (?, ?)', [10, 'tx']);
  await conn.commit();
  await move(id);
  const [big] = await conn.query("SELECT seq, REPEAT('x', 100) AS pad FROM seq_1_to_20000");
  out('large result', digest(big));
  await x('after the large result', 'SELECT name FROM node_t WHERE id = ?', [10]);
  await conn.ping();
  await conn.changeUser({ user: options.user, password: options.password, database: options.database });
  await q('after COM_CHANGE_USER', 'SELECT @a, @@sql_mode = \'ANSI_QUOTES\' AS ansi, DATABASE()');
  await move(id);
  await q('moved after COM_CHANGE_USER', 'SELECT COUNT(*) AS n FROM node_t');
  await conn.end();
}

// mariadb (MariaDB's own Node.js connector): pipelining (several commands sent before the first
// answer), batches (COM_STMT_BULK_EXECUTE where the server offers it), streams, reset.
async function mariadbWorkload() {
  const mariadb = require('mariadb');
  const conn = await mariadb.createConnection({ ...options, pipelining: true, bigIntAsNumber: false, insertIdAsNumber: true });
  const id = conn.threadId;
  const ok = (r) => ({ affectedRows: r.affectedRows, insertId: r.insertId, warningStatus: r.warningStatus });
  await conn.query('CREATE OR REPLACE TABLE node_m (id INT PRIMARY KEY, v VARCHAR(20), d DECIMAL(8,3))');
  out('pipelined', await Promise.all([
    conn.query('SELECT 1 AS a'), conn.query("SET @m = 'pipelined'"), conn.execute('SELECT ? AS b', [2]),
    conn.query('SELECT @m AS m'), conn.execute('SELECT ? AS c, ? AS d', ['three', 4.5]),
  ]).then((all) => all.map((r) => (Array.isArray(r) ? [...r] : ok(r)))));
  out('batch', ok(await conn.batch('INSERT INTO node_m VALUES (?, ?, ?)', [[1, 'a', '1.5'], [2, 'b', null], [3, null, '-2.125']])));
  await move(id);
  out('after a move', [...await conn.query('SELECT * FROM node_m ORDER BY id')]);
  out('batch after a move', ok(await conn.batch('INSERT INTO node_m VALUES (?, ?, ?)', [[4, 'd', '4'], [5, 'e', '5']])));
  out('execute', [...await conn.execute('SELECT v FROM node_m WHERE id = ?', [4])]);
  await move(id);
  out('the same statement after a move', [...await conn.execute('SELECT v FROM node_m WHERE id = ?', [5])]);
  out('pipelined after a move', await Promise.all([
    conn.query('SELECT @m AS m'), conn.execute('SELECT COUNT(*) AS n FROM node_m WHERE id > ?', [1]),
    conn.query('UPDATE node_m SET v = UPPER(v) WHERE id < 3'),
  ]).then((all) => all.map((r) => (Array.isArray(r) ? [...r] : ok(r)))));
  await redirect(id); // the move happens as the first of these arrives, the others queued behind it
  out('pipelined into a move', await Promise.all([
    conn.query('SELECT @m AS m'), conn.execute('SELECT v FROM node_m WHERE id = ?', [1]),
    conn.query("SET @m = 'after'"), conn.query('SELECT @m AS m'),
  ]).then((all) => all.map((r) => (Array.isArray(r) ? [...r] : ok(r)))));
  const streamed = [];
  for await (const row of conn.queryStream('SELECT seq, seq * 2 AS twice FROM seq_1_to_5000')) streamed.push(row);
  out('stream', digest(streamed));
  await conn.beginTransaction();
  await conn.query("INSERT INTO node_m VALUES (6, 'tx', 0)");
  await conn.rollback();
  out('rolled back', [...await conn.query('SELECT COUNT(*) AS n FROM node_m')]);
  await conn.reset();
  out('after COM_RESET_CONNECTION', [...await conn.query('SELECT @m AS m')]);
  await move(id);
  out('moved after the reset', [...await conn.query('SELECT v FROM node_m ORDER BY id')]);
  await conn.end();
}

// mysql (mysqljs, the oldest and still the most installed): its own protocol code, text only,
// parameters escaped by the client; a result streamed with the connection paused and resumed
// (the proxy must hold the backend while the client reads nothing), LOAD DATA LOCAL from a
// stream, COM_CHANGE_USER, and an error in the middle of a multi-statement.
async function mysqlWorkload() {
  const mysql = require('mysql');
  const fs = require('fs');
  const os = require('os');
  const path = require('path');
  const conn = mysql.createConnection({ ...options, supportBigNumbers: true, bigNumberStrings: true });
  const call = (method, ...args) => new Promise((resolve, reject) => {
    conn[method](...args, (err, results, fields) => (err ? reject(err) : resolve([results, fields])));
  });
  await call('connect');
  const id = conn.threadId;
  const column = (f) => (f ? [f.name, f.type, f.flags] : null);
  const shape = ([rows, fields]) => (Array.isArray(rows)
    ? { rows, fields: fields && fields.map((f) => (Array.isArray(f) ? f.map(column) : column(f))) }
    : { affectedRows: rows.affectedRows, insertId: rows.insertId, warningCount: rows.warningCount });
  const q = async (step, sql, params) => out(step, shape(await call('query', sql, params)));
  const failed = async (step, sql) => {
    try {
      await call('query', sql);
      out(step, 'no error');
    } catch (err) {
      out(step, { code: err.code, errno: err.errno, sqlState: err.sqlState, index: err.index });
    }
  };

  await q('table', 'CREATE OR REPLACE TABLE node_j (id INT PRIMARY KEY, name VARCHAR(40), '
    + 'price DECIMAL(10,2), raw BLOB, big BIGINT UNSIGNED)');
  await q('variables', "SET @j = 'jay', @n = 42, SESSION time_zone = '-02:00'");
  for (let i = 1; i <= 5; i += 1) {
    await q(`insert ${i}`, 'INSERT INTO node_j VALUES (?, ?, ?, ?, ?)',
      [i, `j'${i}"\\`, `${i}.5`, Buffer.from([i, 0, 254]), '18446744073709551615']);
  }
  await move(id);
  await q('state after a move', 'SELECT @j, @n, @@time_zone, DATABASE()');
  await q('escaped values came back', 'SELECT * FROM node_j ORDER BY id');
  await failed('an error in a multi-statement', 'SELECT 1 AS one; SELECT * FROM no_such_table; SELECT 3');
  await q('after the error', 'SELECT COUNT(*) AS n FROM node_j');
  const rows = [];
  await new Promise((resolve, reject) => {
    const query = conn.query("SELECT seq, REPEAT('y', 200) AS pad FROM seq_1_to_30000");
    query.on('error', reject).on('result', (row) => {
      rows.push(row);
      if (rows.length % 5000 === 0) { // read nothing for a while: the proxy's buffers fill
        conn.pause();
        setTimeout(() => conn.resume(), 50);
      }
    }).on('end', resolve);
  });
  out('paused stream', digest(rows));
  await move(id);
  await q('moved after the stream', 'SELECT COUNT(*) AS n, @j FROM node_j');
  await redirect(id);
  const file = path.join(os.tmpdir(), `tiproxy-node-${process.pid}.tsv`);
  fs.writeFileSync(file, '100\tfrom a file\t1.00\n101\tsecond line\t2.00\n');
  try {
    await q('LOAD DATA LOCAL into a move', `LOAD DATA LOCAL INFILE ${conn.escape(file)} INTO TABLE node_j (id, name, price)`);
  } finally {
    fs.unlinkSync(file);
  }
  await q('loaded', 'SELECT id, name, price FROM node_j WHERE id >= 100 ORDER BY id');
  await call('beginTransaction');
  await q('in a transaction', 'UPDATE node_j SET price = price * 2 WHERE id = 1');
  await call('rollback');
  await call('ping');
  await call('changeUser', { user: options.user, password: options.password, database: options.database });
  await q('after COM_CHANGE_USER', 'SELECT @j, @@time_zone = \'-02:00\' AS tz, DATABASE()');
  await move(id);
  await q('moved after COM_CHANGE_USER', 'SELECT price FROM node_j WHERE id = 1');
  await call('end');
}

const workloads = { mysql2: mysql2Workload, mariadb: mariadbWorkload, mysql: mysqlWorkload };
const which = workloads[process.argv[2]];
if (!which) {
  process.stderr.write(`usage: node workload.js ${Object.keys(workloads).join('|')}\n`);
  process.exit(2);
}
which().then(() => process.exit(0), (err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
