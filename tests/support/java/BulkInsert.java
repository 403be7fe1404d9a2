// MariaDB Connector/J batch insert (bulk execution, COM_STMT_BULK_EXECUTE) and JSON metadata,
// run by tests/integration/test_mariadb_extensions.py against a server or the proxy.
// Usage: java -cp mariadb-java-client.jar:. BulkInsert HOST PORT USER PASSWORD TABLE ROWS
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.Statement;

public class BulkInsert {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:mariadb://" + args[0] + ":" + args[1] + "/test?useBulkStmts=true";
        String table = args[4];
        int rows = Integer.parseInt(args[5]);
        try (Connection conn = DriverManager.getConnection(url, args[2], args[3])) {
            try (Statement st = conn.createStatement()) {
                st.execute("CREATE OR REPLACE TABLE " + table
                        + " (id INT PRIMARY KEY, name VARCHAR(40), doc JSON)");
            }
            try (PreparedStatement ps = conn.prepareStatement(
                    "INSERT INTO " + table + " VALUES (?, ?, ?)")) {
                for (int i = 0; i < rows; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "row-" + i);
                    ps.setString(3, "{\"n\": " + i + "}");
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                System.out.println("batch " + counts.length);
            }
            try (Statement st = conn.createStatement();
                 ResultSet rs = st.executeQuery(
                         "SELECT COUNT(*), SUM(id), MAX(name), MAX(doc) FROM " + table)) {
                rs.next();
                System.out.println("rows " + rs.getLong(1) + " " + rs.getLong(2) + " "
                        + rs.getString(3) + " " + rs.getString(4));
            }
        }
    }
}
