/*
 * What the tests' Connector/C programs share: stop with the error, run a statement whose rows
 * nobody reads, prepare a statement. Included by ps_progress.c and ps_corners.c.
 */
#ifndef TIPROXY_TEST_CLIENT_H
#define TIPROXY_TEST_CLIENT_H

#include <mysql.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void die(const char *what, const char *error)
{
    printf("ERROR %s: %s\n", what, error);
    exit(1);
}

static void query(MYSQL *mysql, const char *sql)
{
    if (mysql_query(mysql, sql))
        die(sql, mysql_error(mysql));
    MYSQL_RES *res = mysql_store_result(mysql);
    if (res)
        mysql_free_result(res);
}

static MYSQL_STMT *prepare(MYSQL *mysql, const char *sql)
{
    MYSQL_STMT *stmt = mysql_stmt_init(mysql);
    if (!stmt || mysql_stmt_prepare(stmt, sql, strlen(sql)))
        die("prepare", stmt ? mysql_stmt_error(stmt) : mysql_error(mysql));
    return stmt;
}

#endif
