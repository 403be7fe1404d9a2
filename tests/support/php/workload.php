<?php
// A PHP client's workload, driven by tests/integration/test_connectors.py.
//
// Usage: php workload.php mysqli|mysqli_compressed|pdo   (TIPROXY_HOST, TIPROXY_PORT,
// TIPROXY_USER, TIPROXY_PASSWORD, TIPROXY_DATABASE in the environment)
//
// PHP's own protocol implementation (mysqlnd), through mysqli and PDO. Each step's result goes to
// stdout as a line `R <json>`; where the test may move the session the script writes
// `MOVE <connection id>` (or `REDIRECT <id>`: the move happens when a later command arrives) and
// waits for `ok` on stdin. Run directly and through the proxy, the `R` lines must be the same.
declare(strict_types=1);

mysqli_report(MYSQLI_REPORT_ERROR | MYSQLI_REPORT_STRICT);
$input = fopen('php://stdin', 'r');

function ask(string $what, int $id): void
{
    global $input;
    fwrite(STDOUT, "$what $id\n");
    fflush(STDOUT);
    $line = fgets($input);
    if ($line === false || trim($line) !== 'ok') {
        throw new RuntimeException("the test did not answer $what");
    }
}

function plain(mixed $v): mixed
{
    // JSON for what the drivers return: binary strings as hex, floats exactly.
    if (is_array($v)) {
        return array_map('plain', $v);
    }
    if (is_string($v) && preg_match('//u', $v) !== 1) {
        return '0x' . bin2hex($v);
    }
    if (is_float($v)) {
        return sprintf('float %.17g', $v);
    }
    return $v;
}

function out(string $step, mixed $value): void
{
    fwrite(STDOUT, 'R ' . json_encode(['step' => $step, 'value' => plain($value)], JSON_THROW_ON_ERROR) . "\n");
    fflush(STDOUT);
}

function env(string $name): string
{
    $value = getenv($name);
    if ($value === false) {
        throw new RuntimeException("$name is not set");
    }
    return $value;
}

// mysqli: text and binary protocol, long data sent in pieces, multi-statements, an unbuffered
// result, COM_CHANGE_USER; `compressed`: all of it over the compressed protocol.
function mysqliWorkload(bool $compressed): void
{
    $c = mysqli_init();
    $c->options(MYSQLI_OPT_INT_AND_FLOAT_NATIVE, 1);
    $c->real_connect(env('TIPROXY_HOST'), env('TIPROXY_USER'), env('TIPROXY_PASSWORD'),
        env('TIPROXY_DATABASE'), (int) env('TIPROXY_PORT'), null,
        $compressed ? MYSQLI_CLIENT_COMPRESS : 0);
    $id = $c->thread_id;
    $all = fn (mysqli_result $r): array => $r->fetch_all(MYSQLI_ASSOC);
    $c->query('CREATE OR REPLACE TABLE php_t (id INT PRIMARY KEY, name VARCHAR(40), '
        . 'price DECIMAL(10,2), born DATETIME(3), raw LONGBLOB, big BIGINT UNSIGNED, f DOUBLE)');
    $c->query("SET @a = 1, @s = 'héllo', SESSION sql_mode = 'ANSI_QUOTES', time_zone = '+03:00'");
    $c->set_charset('utf8mb4');
    $ins = $c->prepare('INSERT INTO php_t VALUES (?, ?, ?, ?, ?, ?, ?)');
    $i = 0; $name = ''; $price = ''; $born = ''; $raw = null; $big = '18446744073709551615'; $f = 0.0;
    $ins->bind_param('issssss', $i, $name, $price, $born, $raw, $big, $f);
    for ($i = 1; $i <= 4; $i++) {
        $name = "n$i"; $price = "$i.25"; $born = "2020-01-0$i 10:00:00.125"; $f = $i / 3;
        $raw = "\x00$i\xff";
        $ins->execute();
        out("insert $i", [$ins->affected_rows, $c->insert_id]);
    }
    $sel = $c->prepare('SELECT * FROM php_t WHERE id > ? ORDER BY id');
    $min = 2;
    $sel->bind_param('i', $min);
    $sel->execute();
    out('prepared select', $all($sel->get_result()));
    ask('MOVE', $id);
    $min = 3;
    $sel->execute();
    out('the same statement after a move', $all($sel->get_result()));
    out('state after a move', $all($c->query('SELECT @a, @s, @@sql_mode, @@time_zone, DATABASE(), '
        . '@@character_set_client, @@character_set_results')));

    // COM_STMT_SEND_LONG_DATA in pieces, a move asked for between them and the execute.
    $long = $c->prepare('INSERT INTO php_t (id, raw) VALUES (?, ?)');
    $lid = 5; $blob = null;
    $long->bind_param('ib', $lid, $blob);
    $long->send_long_data(1, str_repeat("\x01\x02", 40000));
    ask('REDIRECT', $id);
    $long->send_long_data(1, str_repeat('z', 70000));
    $long->execute();
    out('long data', $all($c->query('SELECT id, LENGTH(raw), MD5(raw) FROM php_t WHERE id = 5')));
    $long->close();

    $c->multi_query('SELECT 1 AS one; SELECT 2 AS two; UPDATE php_t SET name = name WHERE id = 1');
    $results = [];
    do {
        $r = $c->store_result();
        $results[] = $r ? $all($r) : ['affected' => $c->affected_rows];
    } while ($c->next_result());
    out('multi-statement', $results);
    ask('MOVE', $id);

    $c->begin_transaction();
    $c->query("INSERT INTO php_t (id, name) VALUES (10, 'tx')");
    ask('REDIRECT', $id); // not in the middle of the transaction: after it
    $c->query("INSERT INTO php_t (id, name) VALUES (11, 'tx')");
    $c->commit();
    out('after the transaction', $all($c->query('SELECT id, name FROM php_t WHERE id >= 10')));

    $r = $c->query("SELECT seq, REPEAT('x', 100) AS pad FROM seq_1_to_20000", MYSQLI_USE_RESULT);
    $hash = hash_init('sha1');
    $count = 0;
    while ($row = $r->fetch_row()) {
        hash_update($hash, implode(',', $row) . "\n");
        $count++;
    }
    $r->free();
    out('unbuffered result', [$count, hash_final($hash)]);
    ask('MOVE', $id);

    $c->query('SELECT 1 / 0');
    out('warnings', [$c->warning_count, $all($c->query('SHOW WARNINGS'))]);
    $c->change_user(env('TIPROXY_USER'), env('TIPROXY_PASSWORD'), env('TIPROXY_DATABASE'));
    out('after COM_CHANGE_USER', $all($c->query("SELECT @a, @@sql_mode = 'ANSI_QUOTES' AS ansi, DATABASE()")));
    $sel = $c->prepare('SELECT COUNT(*) AS n FROM php_t WHERE id > ?');
    $sel->bind_param('i', $min);
    ask('MOVE', $id);
    $sel->execute();
    out('moved after COM_CHANGE_USER', $all($sel->get_result()));
    $c->close();
}

// PDO: native prepares (the binary protocol) and emulated ones (text with the values quoted by
// the client), persistent connections, NULL and large values, errors that leave the session up.
function pdoWorkload(): void
{
    $dsn = sprintf('mysql:host=%s;port=%s;dbname=%s;charset=utf8mb4', env('TIPROXY_HOST'),
        env('TIPROXY_PORT'), env('TIPROXY_DATABASE'));
    $options = [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION, PDO::ATTR_EMULATE_PREPARES => false,
        PDO::ATTR_STRINGIFY_FETCHES => false, PDO::MYSQL_ATTR_MULTI_STATEMENTS => true];
    $db = new PDO($dsn, env('TIPROXY_USER'), env('TIPROXY_PASSWORD'), $options);
    $id = (int) $db->query('SELECT CONNECTION_ID()')->fetchColumn();
    $db->exec('CREATE OR REPLACE TABLE php_p (id INT PRIMARY KEY, v VARCHAR(20), d DECIMAL(8,3), '
        . 'j JSON, t TIME(6))');
    $ins = $db->prepare('INSERT INTO php_p VALUES (:id, :v, :d, :j, :t)');
    foreach ([[1, 'a', '1.5', '{"k": 1}', '01:02:03.5'], [2, null, null, null, null], [3, 'ç', '-2.125', '[]', '-838:59:59']] as $row) {
        $ins->execute(array_combine(['id', 'v', 'd', 'j', 't'], $row));
        out("insert {$row[0]}", $ins->rowCount());
    }
    $sel = $db->prepare('SELECT * FROM php_p WHERE id >= ? ORDER BY id');
    $sel->execute([1]);
    out('native prepare', $sel->fetchAll(PDO::FETCH_ASSOC));
    ask('MOVE', $id);
    $sel->execute([2]);
    out('the same statement after a move', $sel->fetchAll(PDO::FETCH_ASSOC));
    try {
        $db->exec('INSERT INTO php_p VALUES (1, NULL, NULL, NULL, NULL)');
    } catch (PDOException $e) {
        out('duplicate key', [$e->errorInfo[0], $e->errorInfo[1]]);
    }
    $db->setAttribute(PDO::ATTR_EMULATE_PREPARES, true);
    $emu = $db->prepare('SELECT ? AS s, ? AS n, ? IS NULL AS isnull');
    $emu->execute(["it's \\ quoted", 42, null]);
    out('emulated prepare', $emu->fetchAll(PDO::FETCH_ASSOC));
    $db->setAttribute(PDO::ATTR_EMULATE_PREPARES, false);
    $db->beginTransaction();
    $db->exec("UPDATE php_p SET v = 'in tx' WHERE id = 2");
    ask('REDIRECT', $id);
    $db->rollBack();
    $db->setAttribute(PDO::ATTR_EMULATE_PREPARES, true); // several statements: only as text
    $multi = $db->query('SELECT COUNT(*) AS n FROM php_p; SELECT v FROM php_p WHERE id = 2');
    $sets = [];
    do {
        $sets[] = $multi->fetchAll(PDO::FETCH_ASSOC);
    } while ($multi->nextRowset());
    out('after the rollback', $sets);
    $multi = null;
    $db->setAttribute(PDO::ATTR_EMULATE_PREPARES, false);
    $big = $db->prepare('SELECT ? AS big');
    $big->execute([str_repeat('é', 300000)]);
    out('a large parameter', md5($big->fetchColumn()));
    ask('MOVE', $id);
    $db = null;

    // Persistent connections: each `new PDO` in this process gets the same one back.
    $persistent = $options + [PDO::ATTR_PERSISTENT => true];
    $ids = [];
    for ($n = 0; $n < 3; $n++) {
        $p = new PDO($dsn, env('TIPROXY_USER'), env('TIPROXY_PASSWORD'), $persistent);
        $pid = (int) $p->query('SELECT CONNECTION_ID()')->fetchColumn();
        $ids[] = $pid;
        $p->exec("SET @n = $n");
        out("persistent $n", $p->query('SELECT @n AS n, COUNT(*) AS rows_ FROM php_p')->fetchAll(PDO::FETCH_ASSOC));
        ask('MOVE', $pid);
        $p = null;
    }
    out('one persistent connection', count(array_unique($ids)));
}

$which = $argv[1] ?? '';
try {
    match ($which) {
        'mysqli' => mysqliWorkload(false),
        'mysqli_compressed' => mysqliWorkload(true),
        'pdo' => pdoWorkload(),
    };
} catch (Throwable $e) {
    fwrite(STDERR, get_class($e) . ': ' . $e->getMessage() . "\n" . $e->getTraceAsString() . "\n");
    exit(1);
}
exit(0);
