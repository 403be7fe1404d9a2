/*
 * A MariaDB Connector/C client for the proxy's tests. Connector/C asks for MariaDB's extended
 * capabilities by itself; this exercises two of them:
 * - MARIADB_CLIENT_CACHE_METADATA: prepared statements executed again and again (the server then
 *   leaves out the column definitions, and the client uses those of the PREPARE), before and
 *   after a pause in which the test may move the session to another backend;
 * - MARIADB_CLIENT_PROGRESS: a long ALTER TABLE with a progress callback.
 * Prints what it read, so that a run through the proxy can be compared with a direct one.
 *
 *   ps_progress HOST PORT USER PASSWORD DATABASE
 * After "pause" it waits for a line on stdin.
 */
#include "client.h"

static int progress_reports;

static void on_progress(const MYSQL *mysql, unsigned int stage, unsigned int max_stage,
                        double progress, const char *proc_info, unsigned int proc_info_length)
{
    (void)mysql; (void)stage; (void)max_stage; (void)progress; (void)proc_info;
    (void)proc_info_length;
    progress_reports++;
}

/* Execute with every parameter = n; print every row, with the column names and types. */
static void execute(MYSQL_STMT *stmt, long long n)
{
    unsigned int columns = mysql_stmt_field_count(stmt);
    MYSQL_BIND param[4];
    memset(param, 0, sizeof(param));
    for (unsigned int i = 0; i < mysql_stmt_param_count(stmt) && i < 4; i++) {
        param[i].buffer_type = MYSQL_TYPE_LONGLONG;
        param[i].buffer = &n;
    }
    if (mysql_stmt_bind_param(stmt, param) || mysql_stmt_execute(stmt))
        die("execute", mysql_stmt_error(stmt));
    char value[8][64];
    unsigned long length[8];
    my_bool is_null[8];
    MYSQL_BIND out[8];
    memset(out, 0, sizeof(out));
    for (unsigned int c = 0; c < columns && c < 8; c++) {
        out[c].buffer_type = MYSQL_TYPE_STRING;
        out[c].buffer = value[c];
        out[c].buffer_length = sizeof(value[c]);
        out[c].length = &length[c];
        out[c].is_null = &is_null[c];
    }
    if (mysql_stmt_bind_result(stmt, out) || mysql_stmt_store_result(stmt))
        die("result", mysql_stmt_error(stmt));
    MYSQL_RES *meta = mysql_stmt_result_metadata(stmt);
    while (mysql_stmt_fetch(stmt) == 0) {
        printf("n=%lld:", n);
        for (unsigned int c = 0; c < columns && c < 8; c++) {
            MYSQL_FIELD *field = mysql_fetch_field_direct(meta, c);
            printf(" %s(%d)=%.*s", field->name, (int)field->type,
                   is_null[c] ? 4 : (int)length[c], is_null[c] ? "NULL" : value[c]);
        }
        printf("\n");
    }
    mysql_free_result(meta);
    mysql_stmt_free_result(stmt);
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s HOST PORT USER PASSWORD DATABASE\n", argv[0]);
        return 2;
    }
    MYSQL *mysql = mysql_init(NULL);
    mysql_optionsv(mysql, MYSQL_PROGRESS_CALLBACK, on_progress);
    if (!mysql_real_connect(mysql, argv[1], argv[3], argv[4], argv[5], atoi(argv[2]), NULL, 0))
        die("connect", mysql_error(mysql));
    MYSQL_STMT *values = prepare(mysql, "SELECT ? AS n, CONCAT('x', ?) AS s, ? * 2.5 AS d");
    MYSQL_STMT *rows = prepare(mysql, "SELECT seq, seq * seq AS sq FROM seq_1_to_5 WHERE seq <= ?");
    for (long long n = 1; n <= 3; n++) {
        execute(values, n);
        execute(rows, n);
    }
    printf("pause\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof(line), stdin))
        return 3;
    for (long long n = 4; n <= 5; n++) {
        execute(values, n);
        execute(rows, n);
    }
    query(mysql, "SET SESSION progress_report_time = 1");
    query(mysql, "ALTER TABLE ps_progress_big ALGORITHM = COPY, FORCE");
    printf("progress reports: %s\n", progress_reports > 0 ? "yes" : "none");
    MYSQL_STMT *count = prepare(mysql, "SELECT COUNT(*) AS c FROM ps_progress_big WHERE a > ?");
    execute(count, 7);
    mysql_stmt_close(count);
    mysql_stmt_close(rows);
    mysql_stmt_close(values);
    mysql_close(mysql);
    return 0;
}
