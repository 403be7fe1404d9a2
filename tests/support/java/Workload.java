// MariaDB Connector/J's workload, driven by tests/integration/test_connectors.py.
//
// Usage: java -cp mariadb-java-client.jar:. Workload server|text   (TIPROXY_HOST, TIPROXY_PORT,
// TIPROXY_USER, TIPROXY_PASSWORD, TIPROXY_DATABASE in the environment)
//
// `server`: server-side prepared statements, cached by the driver and kept across moves, with
// batches sent without waiting for each answer (useBatchMultiSend); `text`: the driver's own
// client-side prepared statements. Each step's result goes to stdout as a line `R <json>`; where
// the test may move the session the program writes `MOVE <connection id>` (or `REDIRECT <id>`)
// and waits for `ok` on stdin (support/scripted.py).
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.math.BigDecimal;
import java.security.MessageDigest;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Statement;
import java.sql.Timestamp;
import java.sql.Types;
import java.util.ArrayList;
import java.util.List;

public class Workload {
    static final BufferedReader IN = new BufferedReader(new InputStreamReader(System.in));

    static void ask(String what, long id) throws Exception {
        System.out.println(what + " " + id);
        System.out.flush();
        String line = IN.readLine();
        if (!"ok".equals(line)) {
            throw new IllegalStateException("the test did not answer " + what);
        }
    }

    static String quote(String s) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20) {
                out.append(String.format("\\u%04x", (int) c));
            } else {
                out.append(c);
            }
        }
        return out.append('"').toString();
    }

    static String value(Object v) {
        if (v == null) {
            return "null";
        }
        if (v instanceof byte[]) {
            StringBuilder hex = new StringBuilder("0x");
            for (byte b : (byte[]) v) {
                hex.append(String.format("%02x", b));
            }
            return quote(hex.toString());
        }
        return quote(v.getClass().getSimpleName() + " " + v);
    }

    static void out(String step, String json) {
        System.out.println("R {\"step\": " + quote(step) + ", \"value\": " + json + "}");
        System.out.flush();
    }

    static String rows(ResultSet rs) throws SQLException {
        ResultSetMetaData meta = rs.getMetaData();
        List<String> all = new ArrayList<>();
        List<String> columns = new ArrayList<>();
        for (int i = 1; i <= meta.getColumnCount(); i++) {
            columns.add(quote(meta.getColumnLabel(i) + " " + meta.getColumnTypeName(i)));
        }
        while (rs.next()) {
            List<String> row = new ArrayList<>();
            for (int i = 1; i <= meta.getColumnCount(); i++) {
                row.add(value(rs.getObject(i)));
            }
            all.add("[" + String.join(", ", row) + "]");
        }
        rs.close();
        return "{\"columns\": [" + String.join(", ", columns) + "], \"rows\": ["
                + String.join(", ", all) + "]}";
    }

    static String counts(int[] counts) {
        List<String> parts = new ArrayList<>();
        for (int c : counts) {
            parts.add(Integer.toString(c));
        }
        return "[" + String.join(", ", parts) + "]";
    }

    public static void main(String[] args) throws Exception {
        boolean server = args.length == 1 && args[0].equals("server");
        if (args.length != 1 || !(server || args[0].equals("text"))) {
            System.err.println("usage: Workload server|text");
            System.exit(2);
        }
        String url = "jdbc:mariadb://" + System.getenv("TIPROXY_HOST") + ":"
                + System.getenv("TIPROXY_PORT") + "/" + System.getenv("TIPROXY_DATABASE")
                + "?useServerPrepStmts=" + server + "&cachePrepStmts=true&useBatchMultiSend=true"
                + "&allowMultiQueries=true&allowLocalInfile=true&sessionVariables=time_zone='-02:00'";
        try (Connection conn = DriverManager.getConnection(url, System.getenv("TIPROXY_USER"),
                System.getenv("TIPROXY_PASSWORD"))) {
            Statement st = conn.createStatement();
            ResultSet idRs = st.executeQuery("SELECT CONNECTION_ID()");
            idRs.next();
            long id = idRs.getLong(1);
            idRs.close();
            st.execute("CREATE OR REPLACE TABLE java_t (id INT PRIMARY KEY, name VARCHAR(40), "
                    + "price DECIMAL(10,3), at DATETIME(3), raw VARBINARY(16), big BIGINT UNSIGNED)");
            st.execute("SET @j = 'java', SESSION sql_mode = 'ANSI_QUOTES,STRICT_ALL_TABLES'");
            String insert = "INSERT INTO java_t VALUES (?, ?, ?, ?, ?, ?)";
            try (PreparedStatement ps = conn.prepareStatement(insert)) {
                for (int i = 1; i <= 6; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "n" + i);
                    ps.setBigDecimal(3, new BigDecimal(i + ".125"));
                    ps.setTimestamp(4, Timestamp.valueOf("2022-03-0" + i + " 10:11:12.345"));
                    ps.setBytes(5, new byte[] {0, (byte) i, (byte) 255});
                    if (i % 2 == 0) {
                        ps.setNull(6, Types.BIGINT);
                    } else {
                        ps.setString(6, "18446744073709551615");
                    }
                    ps.addBatch();
                }
                out("batch", counts(ps.executeBatch()));
            }
            PreparedStatement select = conn.prepareStatement(
                    "SELECT * FROM java_t WHERE id > ? ORDER BY id");
            select.setInt(1, 3);
            out("prepared select", rows(select.executeQuery()));
            ask("MOVE", id);
            select.setInt(1, 4);
            out("the same statement after a move", rows(select.executeQuery()));
            try (PreparedStatement ps = conn.prepareStatement(insert)) {  // from the driver's cache
                for (int i = 7; i <= 9; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, null);
                    ps.setBigDecimal(3, null);
                    ps.setTimestamp(4, null);
                    ps.setBytes(5, null);
                    ps.setLong(6, i);
                    ps.addBatch();
                }
                ask("REDIRECT", id);  // the batch's commands go out at once, into the move
                out("batch into a move", counts(ps.executeBatch()));
            }
            out("state after a move", rows(st.executeQuery(
                    "SELECT @j, @@time_zone, @@sql_mode, DATABASE(), COUNT(*) FROM java_t")));
            conn.setAutoCommit(false);
            try (PreparedStatement ps = conn.prepareStatement("UPDATE java_t SET name = ? WHERE id = ?")) {
                ps.setString(1, "in tx");
                ps.setInt(2, 1);
                out("update", Integer.toString(ps.executeUpdate()));
                ask("REDIRECT", id);  // not in the middle of the transaction: after it
                ps.setInt(2, 2);
                out("update again", Integer.toString(ps.executeUpdate()));
            }
            conn.commit();
            conn.setAutoCommit(true);
            try {
                st.execute("INSERT INTO java_t (id) VALUES (1)");
            } catch (SQLException e) {
                out("duplicate key", "[" + quote(e.getSQLState()) + ", " + e.getErrorCode() + "]");
            }
            boolean more = st.execute("SELECT 1 AS one; SELECT name FROM java_t WHERE id < 3 ORDER BY id");
            List<String> sets = new ArrayList<>();
            while (more) {
                sets.add(rows(st.getResultSet()));
                more = st.getMoreResults();
            }
            out("multi-statement", "[" + String.join(", ", sets) + "]");
            st.setFetchSize(Integer.MIN_VALUE);  // streamed, row by row
            ResultSet big = st.executeQuery("SELECT seq, REPEAT('x', 100) FROM seq_1_to_20000");
            MessageDigest digest = MessageDigest.getInstance("SHA-1");
            int count = 0;
            while (big.next()) {
                digest.update((big.getLong(1) + "," + big.getString(2) + "\n").getBytes("UTF-8"));
                count++;
            }
            big.close();
            st.setFetchSize(0);
            StringBuilder hex = new StringBuilder();
            for (byte b : digest.digest()) {
                hex.append(String.format("%02x", b));
            }
            out("streamed result", "[" + count + ", " + quote(hex.toString()) + "]");
            ask("MOVE", id);
            select.setInt(1, 7);
            out("the first statement once more", rows(select.executeQuery()));
            select.close();
        }
    }
}
