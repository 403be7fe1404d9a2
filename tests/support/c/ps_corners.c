/*
 * Corners of the binary protocol that MariaDB's own test suite (run with --ps-protocol and
 * --cursor-protocol) reaches, as MariaDB Connector/C meets them:
 * - a prepared CALL whose procedure holds a cursor open (CURSOR_EXISTS with rows following);
 * - a prepared LOAD DATA LOCAL INFILE (the server asks for the file from an execute);
 * - a cursor that fails to open (an ERR where the EOF after the columns was due).
 * Prints what it got, so that a run through the proxy can be compared with a direct one.
 *
 *   ps_corners HOST PORT USER PASSWORD DATABASE FILE
 */
#include "client.h"

/* Execute a prepared statement (with a read-only cursor if asked); print every result set. */
static void run(MYSQL *mysql, const char *sql, int cursor)
{
    MYSQL_STMT *stmt = prepare(mysql, sql);
    if (cursor) {
        unsigned long type = CURSOR_TYPE_READ_ONLY;
        mysql_stmt_attr_set(stmt, STMT_ATTR_CURSOR_TYPE, &type);
    }
    printf("%s:\n", sql);
    if (mysql_stmt_execute(stmt)) {
        printf("  error %u\n", mysql_stmt_errno(stmt));
        mysql_stmt_close(stmt);
        return;
    }
    do {
        unsigned int columns = mysql_stmt_field_count(stmt);
        if (columns == 0) {
            printf("  affected %llu\n", (unsigned long long)mysql_stmt_affected_rows(stmt));
            continue;
        }
        char value[4][64];
        unsigned long length[4];
        my_bool is_null[4];
        MYSQL_BIND out[4];
        memset(out, 0, sizeof(out));
        for (unsigned int c = 0; c < columns && c < 4; c++) {
            out[c].buffer_type = MYSQL_TYPE_STRING;
            out[c].buffer = value[c];
            out[c].buffer_length = sizeof(value[c]);
            out[c].length = &length[c];
            out[c].is_null = &is_null[c];
        }
        if (mysql_stmt_bind_result(stmt, out))
            die("bind", mysql_stmt_error(stmt));
        int status;
        while ((status = mysql_stmt_fetch(stmt)) == 0) {
            printf(" ");
            for (unsigned int c = 0; c < columns && c < 4; c++)
                printf(" %.*s", is_null[c] ? 4 : (int)length[c], is_null[c] ? "NULL" : value[c]);
            printf("\n");
        }
        if (status != MYSQL_NO_DATA)
            printf("  fetch error %u\n", mysql_stmt_errno(stmt));
        mysql_stmt_free_result(stmt);
    } while (mysql_stmt_next_result(stmt) == 0);
    mysql_stmt_close(stmt);
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: %s HOST PORT USER PASSWORD DATABASE FILE\n", argv[0]);
        return 2;
    }
    MYSQL *mysql = mysql_init(NULL);
    unsigned int local_infile = 1;
    mysql_optionsv(mysql, MYSQL_OPT_LOCAL_INFILE, &local_infile);
    if (!mysql_real_connect(mysql, argv[1], argv[3], argv[4], argv[5], atoi(argv[2]), NULL,
                            CLIENT_MULTI_RESULTS))
        die("connect", mysql_error(mysql));
    run(mysql, "CALL corners_open_cursor()", 0);
    char load[512];
    snprintf(load, sizeof(load), "LOAD DATA LOCAL INFILE '%s' INTO TABLE corners_load", argv[6]);
    run(mysql, load, 0);
    run(mysql, "SELECT a, b FROM corners_load ORDER BY a", 0);
    query(mysql, "SET SESSION sql_mode = 'STRICT_ALL_TABLES'");
    run(mysql, "SELECT corners_out_of_range()", 1);
    run(mysql, "SELECT a FROM corners_load ORDER BY a", 1);
    query(mysql, "SELECT 1");
    printf("still connected\n");
    mysql_close(mysql);
    return 0;
}
