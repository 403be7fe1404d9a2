// A Go client's workload, driven by tests/integration/test_connectors.py.
//
// Usage: workload binary|interpolate   (TIPROXY_HOST, TIPROXY_PORT, TIPROXY_USER,
// TIPROXY_PASSWORD, TIPROXY_DATABASE in the environment)
//
// go-sql-driver/mysql under database/sql: server-side prepared statements (`binary`) or the
// driver's own interpolation into text queries (`interpolate`). Each step's result goes to stdout
// as a line `R <json>`; where the test may move the session the program writes
// `MOVE <connection id>` (or `REDIRECT <id>`: the move happens when a later command arrives) and
// waits for `ok` on stdin. Run directly and through the proxy, the `R` lines must be the same.
package main

import (
	"bufio"
	"context"
	"crypto/sha1"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/go-sql-driver/mysql"
)

var input = bufio.NewScanner(os.Stdin)

func ask(what string, id int64) {
	fmt.Printf("%s %d\n", what, id)
	if !input.Scan() || input.Text() != "ok" {
		panic(fmt.Sprintf("the test did not answer %s", what))
	}
}

func out(step string, value interface{}) {
	line, err := json.Marshal(map[string]interface{}{"step": step, "value": value})
	check(err)
	fmt.Printf("R %s\n", line)
}

func check(err error) {
	if err != nil {
		panic(err)
	}
}

// plain turns a scanned value into JSON the two runs can compare: bytes as text or hex.
func plain(v interface{}) interface{} {
	switch x := v.(type) {
	case []byte:
		if utf8.Valid(x) {
			return string(x)
		}
		return "0x" + hex.EncodeToString(x)
	case time.Time:
		return x.Format(time.RFC3339Nano)
	case float64:
		return fmt.Sprintf("float %.17g", x)
	default:
		return x
	}
}

// all reads every row, with the columns' names and database types.
func all(rows *sql.Rows, err error) map[string]interface{} {
	check(err)
	defer rows.Close()
	types, err := rows.ColumnTypes()
	check(err)
	var columns []string
	for _, t := range types {
		columns = append(columns, t.Name()+" "+t.DatabaseTypeName())
	}
	var got [][]interface{}
	for rows.Next() {
		values := make([]interface{}, len(types))
		ptrs := make([]interface{}, len(types))
		for i := range values {
			ptrs[i] = &values[i]
		}
		check(rows.Scan(ptrs...))
		for i := range values {
			values[i] = plain(values[i])
		}
		got = append(got, values)
	}
	check(rows.Err())
	return map[string]interface{}{"columns": columns, "rows": got}
}

func affected(res sql.Result, err error) []int64 {
	check(err)
	n, err := res.RowsAffected()
	check(err)
	id, err := res.LastInsertId()
	check(err)
	return []int64{n, id}
}

func main() {
	if len(os.Args) != 2 || (os.Args[1] != "binary" && os.Args[1] != "interpolate") {
		fmt.Fprintln(os.Stderr, "usage: workload binary|interpolate")
		os.Exit(2)
	}
	cfg := mysql.NewConfig()
	cfg.User = os.Getenv("TIPROXY_USER")
	cfg.Passwd = os.Getenv("TIPROXY_PASSWORD")
	cfg.Net = "tcp"
	cfg.Addr = os.Getenv("TIPROXY_HOST") + ":" + os.Getenv("TIPROXY_PORT")
	cfg.DBName = os.Getenv("TIPROXY_DATABASE")
	cfg.ParseTime = true
	cfg.MultiStatements = true
	cfg.InterpolateParams = os.Args[1] == "interpolate"
	cfg.Params = map[string]string{"time_zone": "'+03:00'", "sql_mode": "'ANSI_QUOTES'"}
	db, err := sql.Open("mysql", cfg.FormatDSN())
	check(err)
	defer db.Close()
	db.SetMaxOpenConns(1)
	ctx := context.Background()
	conn, err := db.Conn(ctx)
	check(err)
	var id int64
	check(conn.QueryRowContext(ctx, "SELECT CONNECTION_ID()").Scan(&id))

	_, err = conn.ExecContext(ctx, "CREATE OR REPLACE TABLE go_t (id INT PRIMARY KEY, "+
		"name VARCHAR(40), price DECIMAL(10,2), born DATETIME(6), raw BLOB, "+
		"big BIGINT UNSIGNED, f DOUBLE, n INT NULL)")
	check(err)
	_, err = conn.ExecContext(ctx, "SET @a = 1, @s = 'héllo'")
	check(err)
	ins, err := conn.PrepareContext(ctx, "INSERT INTO go_t VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
	check(err)
	born := time.Date(2020, 1, 2, 3, 4, 5, 123456000, time.UTC)
	for i := 1; i <= 4; i++ {
		var n interface{}
		if i%2 == 0 {
			n = i
		}
		out(fmt.Sprintf("insert %d", i), affected(ins.ExecContext(ctx, i, fmt.Sprintf("n%d", i),
			fmt.Sprintf("%d.25", i), born.Add(time.Duration(i)*time.Hour), []byte{0, byte(i), 255},
			uint64(18446744073709551615), float64(i)/3, n)))
	}
	sel, err := conn.PrepareContext(ctx, "SELECT * FROM go_t WHERE id > ? ORDER BY id")
	check(err)
	out("prepared select", all(sel.QueryContext(ctx, 2)))
	ask("MOVE", id)
	out("the same statement after a move", all(sel.QueryContext(ctx, 3)))
	out("the insert after a move", affected(ins.ExecContext(ctx, 5, "five", "5", born, nil,
		uint64(1), 0.5, nil)))
	out("state after a move", all(conn.QueryContext(ctx,
		"SELECT @a, @s, @@sql_mode, @@time_zone, DATABASE(), @@character_set_client")))
	out("parameters", all(conn.QueryContext(ctx, "SELECT ? AS s, ? AS i, ? IS NULL AS isnull, ? AS t",
		"it's \\ quoted", -7, nil, born)))

	rows, err := conn.QueryContext(ctx, "SELECT 1 AS one; SELECT 'two' AS two")
	check(err)
	var sets []interface{}
	for {
		for rows.Next() {
			var v interface{}
			check(rows.Scan(&v))
			sets = append(sets, plain(v))
		}
		if !rows.NextResultSet() {
			break
		}
	}
	check(rows.Err())
	rows.Close()
	out("multi-statement", sets)

	tx, err := conn.BeginTx(ctx, nil)
	check(err)
	_, err = tx.ExecContext(ctx, "INSERT INTO go_t (id, name) VALUES (?, 'tx')", 10)
	check(err)
	ask("REDIRECT", id) // not in the middle of the transaction: after it
	_, err = tx.ExecContext(ctx, "INSERT INTO go_t (id, name) VALUES (?, 'tx')", 11)
	check(err)
	check(tx.Commit())
	out("after the transaction", all(conn.QueryContext(ctx, "SELECT id, name FROM go_t WHERE id >= 10")))

	big, err := conn.QueryContext(ctx, "SELECT seq, REPEAT('x', 100) AS pad FROM seq_1_to_20000")
	check(err)
	hash := sha1.New()
	count := 0
	for big.Next() {
		var seq int64
		var pad string
		check(big.Scan(&seq, &pad))
		fmt.Fprintf(hash, "%d,%s\n", seq, pad)
		count++
	}
	check(big.Err())
	big.Close()
	out("large result", []interface{}{count, hex.EncodeToString(hash.Sum(nil))})
	ask("MOVE", id)

	dir, err := os.MkdirTemp("", "workload")
	check(err)
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "rows.tsv")
	check(os.WriteFile(path, []byte(strings.Repeat("100\tfrom a file\n", 1)+"101\tand another\n"), 0o600))
	mysql.RegisterLocalFile(path)
	out("load data local", affected(conn.ExecContext(ctx, fmt.Sprintf(
		"LOAD DATA LOCAL INFILE '%s' INTO TABLE go_t (id, name)", path))))
	ask("MOVE", id)
	out("after load data", all(conn.QueryContext(ctx, "SELECT COUNT(*) FROM go_t")))
	check(sel.Close())
	check(ins.Close())

	// A deadline that ends a query: the driver drops that connection and the pool opens another.
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = conn.ExecContext(short, "DO SLEEP(3)")
	cancel()
	out("deadline", errors.Is(err, context.DeadlineExceeded) || errors.Is(err, mysql.ErrInvalidConn))
	conn.Close()
	var one int
	check(db.QueryRowContext(ctx, "SELECT COUNT(*) FROM go_t WHERE id > ?", 0).Scan(&one))
	out("a new connection from the pool", one)
}
