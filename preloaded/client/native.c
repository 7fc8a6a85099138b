/* native.c: the native fast path of a py-preload starter (DESIGN.md, "Native fast path").
 *
 * A native starter FILE is this program with its configuration appended (the layout is in
 * preloaded/client/native.py). It runs a command warm only when stdin, stdout and stderr are
 * open and no terminal, the command line and the environment are ones the server takes as they
 * are, and the bundle's server is already listening. It then sends the very request frame the
 * Python client sends (preloaded/client/run.py) with fds 0, 1, 2 and the caller's others,
 * forwards signals as preloaded/client/signals.py does, and ends the way the child ended.
 *
 * Everything else execs the Python starter (python -SI -c BOOT PKG_ROOT FILE ARGS...), which
 * then does exactly what a Python starter does: this file only ever takes a subset of the
 * Python client's decisions, never one of its own. libc only; every buffer is bounded.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <langinfo.h>
#include <locale.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/syscall.h>
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434 /* Linux 5.3, the same number on every architecture */
#endif
#endif
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <sys/un.h>
#include <unistd.h>

extern char **environ;

#define MAX_FRAME (1u << 20) /* preloaded/wire.py MAX_FRAME */
#define MAX_BLOCK (1u << 20) /* the embedded configuration */
#define MAGIC "PYPRLD1\n"     /* preloaded/client/native.py MAGIC: 8 bytes, then 8 hex digits */
#define TRAILER 16
#define MAX_ENV 4096 /* more variables than this: the Python client handles them */
#define MAX_FDS 253  /* preloaded/wire.py MAX_FDS: stdio, then the caller's other fds */

static const char BOOT[] =
    "import sys; sys.path.append(sys.argv.pop(1)); "
    "from preloaded.client.native import main; main()";

/* preloaded/client/starter.py COLD_ENV: a non-empty value makes the run cold. */
static const char *const COLD_ENV[] = {
    "PYTHONHASHSEED", "PYTHONOPTIMIZE", "PYTHONDEBUG", "PYTHONVERBOSE", "PYTHONNOUSERSITE",
    "PYTHONUTF8", "PYTHONDEVMODE", "PYTHONTRACEMALLOC", "PYTHONFAULTHANDLER", "PYTHONMALLOC",
    "PYTHONMALLOCSTATS", "PYTHONCOERCECLOCALE", "PYTHONHOME", "PYTHONPLATLIBDIR",
    "PYTHONSAFEPATH", "PYTHONINTMAXSTRDIGITS", "PYTHONPYCACHEPREFIX",
    "PYTHONWARNDEFAULTENCODING", "PYTHONNODEBUGRANGES", "PYTHONPROFILEIMPORTTIME",
    "PYTHONEXECUTABLE", "PYTHONUSERBASE", "PYTHONPERFSUPPORT", "PYTHON_GIL", "PYTHON_CPU_COUNT",
    "PYTHON_FROZEN_MODULES", "PYTHON_PERF_JIT_SUPPORT", "PYTHON_JIT", "PYTHONCASEOK",
};

/* preloaded/client/signals.py FORWARDED and INHERITABLE, in the same order. */
static const int FORWARDED[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
static const int INHERITABLE[] = {SIGINT,  SIGTERM, SIGHUP,  SIGQUIT,  SIGUSR1, SIGUSR2,
                                  SIGTSTP, SIGTTIN, SIGTTOU, SIGWINCH, SIGCONT};
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* The embedded configuration: NUL-terminated strings inside one allocated block. */
static struct {
    const char *python, *overlay, *pkg_root;
} config;
static char self_path[4096]; /* this starter, as /proc/self/exe names it */
static const char *coerced_lc_ctype; /* LC_CTYPE as python's start-up sets it (PEP 538) */
static int utf8_mode;                /* python's UTF-8 mode: the C or POSIX locale (PEP 540) */

/* ---- falling back to the Python starter ---------------------------------------------- */

/* A last line on stderr; 0 when it was written. A stderr nobody reads fails the write with
 * EPIPE instead of killing this process by SIGPIPE: python ignores SIGPIPE. */
static int last_words(const char *line, int n) {
    if (n <= 0)
        return 0;
    signal(SIGPIPE, SIG_IGN);
    return write(2, line, (size_t)n) == n ? 0 : -1;
}

static void die(const char *what, const char *detail) {
    char line[1024];
    int n = snprintf(line, sizeof line, "py-preload: %s: %s\n", what, detail);
    (void)last_words(line, n < (int)sizeof line ? n : (int)sizeof line - 1);
    _exit(127);
}

static void exec_or_die(char **args) {
    execv(config.python, args);
    char what[4200];
    snprintf(what, sizeof what, "cannot run %s", config.python);
    die(what, strerror(errno));
}

/* Replace this process with the Python starter running the same command line. */
static void exec_python(char **argv) {
    size_t argc = 0;
    while (argv[argc])
        argc++;
    char **args = calloc(argc + 6, sizeof *args);
    if (!args)
        die("out of memory", config.python);
    size_t n = 0;
    args[n++] = (char *)config.python;
    args[n++] = "-SI";
    args[n++] = "-c";
    args[n++] = (char *)BOOT;
    args[n++] = (char *)config.pkg_root;
    args[n++] = self_path;
    for (size_t i = 1; i < argc; i++)
        args[n++] = argv[i];
    args[n] = NULL;
    exec_or_die(args);
}

/* Replace this process with the real interpreter running the same command (starter.py
 * exec_cold, for a bundle without an overlay: the environment is the caller's as it is). */
static void exec_cold(char **argv) {
    argv[0] = (char *)config.python;
    exec_or_die(argv);
}

/* ---- the configuration ----------------------------------------------------------------- */

static int read_at(int fd, char *buf, size_t size, off_t offset) {
    size_t done = 0;
    while (done < size) {
        ssize_t r = pread(fd, buf + done, size - done, offset + (off_t)done);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        done += (size_t)r;
    }
    return 0;
}

/* The fields after the JSON block: python, overlay, pkg_root (see native.py's pack). */
static int split_fields(char *block, size_t size) {
    const char *fields[4];
    size_t start = 0;
    for (int i = 0; i < 4; i++) {
        char *end = memchr(block + start, '\0', size - start);
        if (!end)
            return -1;
        fields[i] = block + start;
        start = (size_t)(end - block) + 1;
    }
    config.python = fields[1];
    config.overlay = fields[2];
    config.pkg_root = fields[3];
    return config.python[0] == '/' ? 0 : -1;
}

static void load_config(void) {
    ssize_t n = readlink("/proc/self/exe", self_path, sizeof self_path - 1);
    if (n <= 0 || (size_t)n >= sizeof self_path - 1)
        die("cannot find this starter", "/proc/self/exe");
    self_path[n] = '\0';
    static const char deleted[] = " (deleted)"; /* replaced since it started: use the new one */
    size_t len = (size_t)n, dlen = sizeof deleted - 1;
    if (len > dlen && strcmp(self_path + len - dlen, deleted) == 0)
        self_path[len - dlen] = '\0';

    int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    struct stat st;
    char trailer[TRAILER + 1];
    if (fd < 0 || fstat(fd, &st) < 0 || st.st_size < TRAILER ||
        read_at(fd, trailer, TRAILER, st.st_size - TRAILER) < 0 ||
        memcmp(trailer, MAGIC, 8) != 0)
        die(self_path, "not a starter written by py-preload bundle (no configuration)");
    trailer[TRAILER] = '\0';
    char *end;
    unsigned long size = strtoul(trailer + 8, &end, 16);
    if (*end || size == 0 || size > MAX_BLOCK || (off_t)size > st.st_size - TRAILER)
        die(self_path, "the starter's configuration is damaged");
    char *block = malloc(size);
    if (!block || read_at(fd, block, size, st.st_size - TRAILER - (off_t)size) < 0 ||
        split_fields(block, size) < 0)
        die(self_path, "the starter's configuration is damaged");
    close(fd);
}

/* ---- python's command line (preloaded/client/starter.py parse_args) --------------------- */

struct command {
    const char *mode;
    const char *target; /* NULL: null */
    char **argv;        /* what sys.argv becomes, after `prefix` if any */
    const char *prefix; /* "-c" or "-m", put before argv */
    int argc;
    int u, B, i, q;
    const char *W[64];
    int nW;
};

/* 0 when the command can run warm as it is; -1 when it must run cold (Python decides how). */
static int parse_args(int argc, char **argv, struct command *cmd) {
    int i = 1;
    memset(cmd, 0, sizeof *cmd);
    for (; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--") == 0) {
            i++;
            break;
        }
        if (strcmp(arg, "-") == 0 || arg[0] != '-')
            break;
        if (arg[1] == '-')
            return -1; /* a long option */
        for (int j = 1; arg[j]; j++) {
            char ch = arg[j];
            if (ch == 'c' || ch == 'm' || ch == 'W' || ch == 'X') {
                const char *value = arg + j + 1;
                if (!*value) {
                    if (++i >= argc)
                        return -1;
                    value = argv[i];
                }
                if (ch == 'X')
                    return -1;
                if (ch == 'W') {
                    if (cmd->nW == (int)COUNT(cmd->W))
                        return -1;
                    cmd->W[cmd->nW++] = value;
                    break;
                }
                cmd->mode = ch == 'c' ? "code" : "module";
                cmd->target = value;
                cmd->prefix = ch == 'c' ? "-c" : "-m";
                cmd->argv = argv + i + 1;
                cmd->argc = argc - i - 1;
                return 0;
            }
            if (ch == 'u')
                cmd->u = 1;
            else if (ch == 'B')
                cmd->B = 1;
            else if (ch == 'i')
                cmd->i = 1;
            else if (ch == 'q')
                cmd->q = 1;
            else
                return -1; /* start-up only, informational, or unknown */
        }
    }
    if (i < argc) {
        cmd->target = argv[i];
        cmd->mode = strcmp(argv[i], "-") == 0 ? "stdin" : "script";
        cmd->argv = argv + i;
        cmd->argc = argc - i;
    } else {
        cmd->mode = cmd->i ? "repl" : "stdin"; /* stdin is no terminal here */
    }
    return 0;
}

/* ---- the environment (starter.py env_cold_reason, with_overlay) ------------------------- */

static const char *env_get(const char *name) {
    size_t n = strlen(name);
    for (char **e = environ; *e; e++)
        if (strncmp(*e, name, n) == 0 && (*e)[n] == '=')
            return *e + n + 1; /* the first one, as os.environ keeps it */
    return NULL;
}

static int env_is_cold(void) {
    const char *v = env_get("PY_PRELOAD_COLD");
    if (v && *v && strcmp(v, "0") != 0)
        return 1;
    for (size_t k = 0; k < COUNT(COLD_ENV); k++) {
        v = env_get(COLD_ENV[k]);
        if (v && *v) /* PYTHONHASHSEED=random too: a fork keeps the server's hash secret */
            return 1;
    }
    v = env_get("PYTHONIOENCODING");
    return v && *v && *v != ':'; /* a codec name: only Python can look it up */
}

/* Is `item` one of the ':'-separated entries of `path`? */
static int path_has(const char *path, const char *item) {
    size_t n = strlen(item);
    for (const char *p = path;; p++) {
        const char *end = strchr(p, ':');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && strncmp(p, item, n) == 0)
            return 1;
        if (!end)
            return 0;
        p = end;
    }
}

/* ---- JSON, as preloaded/wire.py writes it (ensure_ascii, compact) ----------------------- */

struct out {
    char *buf;
    size_t len, cap;
    int full;
};

static void put(struct out *o, const char *s, size_t n) {
    if (o->full || n > o->cap - o->len) {
        o->full = 1;
        return;
    }
    memcpy(o->buf + o->len, s, n);
    o->len += n;
}

static void puts_(struct out *o, const char *s) { put(o, s, strlen(s)); }

static void put_u(struct out *o, unsigned c) { /* \uXXXX, lower-case hex like _json */
    static const char hex[] = "0123456789abcdef";
    char e[6] = {'\\', 'u', hex[(c >> 12) & 15], hex[(c >> 8) & 15], hex[(c >> 4) & 15],
                 hex[c & 15]};
    put(o, e, 6);
}

/* Length of the valid UTF-8 sequence at s (Unicode's table 3-7, as python decodes), 0 if
 * none starts there; *cp gets the code point. */
static size_t utf8_seq(const unsigned char *s, unsigned *cp) {
    unsigned c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    size_t n;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF)
        n = 2, *cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF) {
        n = 3, *cp = c & 0x0F;
        if (c == 0xE0)
            lo = 0xA0;
        if (c == 0xED)
            hi = 0x9F; /* no surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4, *cp = c & 0x07;
        if (c == 0xF0)
            lo = 0x90;
        if (c == 0xF4)
            hi = 0x8F; /* nothing above U+10FFFF */
    } else
        return 0;
    for (size_t k = 1; k < n; k++) {
        unsigned b = s[k]; /* a NUL ends the string and fails the range check */
        if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF))
            return 0;
        *cp = (*cp << 6) | (b & 0x3F);
    }
    return n;
}

/* A JSON string of bytes decoded as os.fsdecode does (UTF-8, surrogateescape). With
 * `strict`, bytes that are not UTF-8 fail instead (-1): sys.argv is decoded by the C
 * library's mbstowcs, whose corner cases are not worth mirroring. */
static int put_str(struct out *o, const char *str, int strict) {
    const unsigned char *s = (const unsigned char *)str;
    put(o, "\"", 1);
    while (*s) {
        unsigned c;
        size_t n = utf8_seq(s, &c);
        if (n == 0) {
            if (strict)
                return -1;
            put_u(o, 0xDC00 + *s); /* surrogateescape */
            s++;
            continue;
        }
        s += n;
        if (c >= 0x20 && c <= 0x7E && c != '"' && c != '\\') {
            char ch = (char)c;
            put(o, &ch, 1);
        } else if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            put(o, e, 2);
        } else if (c == '\b' || c == '\f' || c == '\n' || c == '\r' || c == '\t') {
            char e[2] = {'\\', c == '\b'   ? 'b'
                                : c == '\f' ? 'f'
                                : c == '\n' ? 'n'
                                : c == '\r' ? 'r'
                                            : 't'};
            put(o, e, 2);
        } else if (c >= 0x10000) {
            put_u(o, 0xD800 + ((c - 0x10000) >> 10));
            put_u(o, 0xDC00 + ((c - 0x10000) & 0x3FF));
        } else {
            put_u(o, c);
        }
    }
    put(o, "\"", 1);
    return 0;
}

static void put_int(struct out *o, long long v) {
    char num[32];
    int n = snprintf(num, sizeof num, "%lld", v);
    put(o, num, (size_t)n);
}

static int put_list(struct out *o, const char *first, char **items, int count, int strict) {
    put(o, "[", 1);
    int rc = first ? put_str(o, first, strict) : 0;
    for (int k = 0; k < count && rc == 0; k++) {
        if (first || k)
            put(o, ",", 1);
        rc = put_str(o, items[k], strict);
    }
    put(o, "]", 1);
    return rc;
}

/* "KEY":"VALUE" of one environment entry (the bytes before '=' and after). */
static void put_env_item(struct out *o, const char *entry, size_t keylen, const char *value) {
    char key[4096];
    if (keylen >= sizeof key) {
        o->full = 1;
        return;
    }
    memcpy(key, entry, keylen);
    key[keylen] = '\0';
    put_str(o, key, 0);
    put(o, ":", 1);
    put_str(o, value, 0);
}

/* dict(os.environ) with python's start-up changes: LC_CTYPE coerced (setenv: in place, or
 * appended), then PYTHONPATH set by the starter (a dict key: in place, or last); NULL values
 * change nothing. The first entry of each name, in environ's order, as os.environ keeps it. */
static void put_env(struct out *o, const char *lc_ctype, const char *pythonpath) {
    const char *names[2] = {"LC_CTYPE", "PYTHONPATH"}, *values[2] = {lc_ctype, pythonpath};
    int done[2] = {0, 0};
    size_t seen = 0;
    put(o, "{", 1);
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq)
            continue;
        size_t keylen = (size_t)(eq - *e);
        int duplicate = 0;
        for (char **f = environ; f < e && !duplicate; f++)
            duplicate = strncmp(*f, *e, keylen + 1) == 0;
        if (duplicate)
            continue;
        if (++seen > MAX_ENV) {
            o->full = 1;
            return;
        }
        if (seen > 1)
            put(o, ",", 1);
        const char *value = eq + 1;
        for (int k = 0; k < 2; k++)
            if (values[k] && keylen == strlen(names[k]) && strncmp(*e, names[k], keylen) == 0)
                value = values[k], done[k] = 1;
        put_env_item(o, *e, keylen, value);
    }
    for (int k = 0; k < 2; k++) {
        if (values[k] && !done[k]) {
            if (seen++)
                put(o, ",", 1);
            put_env_item(o, names[k], strlen(names[k]), values[k]);
        }
    }
    put(o, "}", 1);
}

static int extra_fds[MAX_FDS - 3], nextra;

static int by_number(const void *a, const void *b) {
    return *(const int *)a - *(const int *)b;
}

/* preloaded/client/run.py caller_fds: the caller's fds above 2, each to land at its own
 * number in the child. An exec clears close-on-exec on every fd it keeps, and this client
 * opens its own with it: what lacks it is the caller's. -1 when they cannot be listed, or are
 * more than one message carries (the Python starter then runs the command cold). */
static int list_caller_fds(void) {
    DIR *dir = opendir("/proc/self/fd");
    if (!dir)
        return -1;
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (e = readdir(dir))) {
        char *end;
        long fd = strtol(e->d_name, &end, 10);
        if (e->d_name[0] < '0' || e->d_name[0] > '9' || *end || fd <= 2 || fd == dirfd(dir))
            continue;
        int flags = fcntl((int)fd, F_GETFD);
        if (flags < 0 || (flags & FD_CLOEXEC))
            continue;
        if (nextra == MAX_FDS - 3)
            rc = -1;
        else
            extra_fds[nextra++] = (int)fd;
    }
    closedir(dir);
    qsort(extra_fds, (size_t)nextra, sizeof extra_fds[0], by_number);
    return rc;
}

/* The request of preloaded/client/run.py build_request, byte for byte; -1: leave it to
 * the Python client (an argument that is not UTF-8, a frame too big). */
static int build_request(struct out *o, struct command *cmd, int argc, char **argv,
                         const char *cwd, const char *pythonpath, const int *ignored,
                         int nignored) {
    mode_t mask = umask(0);
    umask(mask);
    put(o, "\0\0\0\0", 4); /* the length, filled in below */
    puts_(o, "{\"v\":1,\"mode\":\"");
    puts_(o, cmd->mode);
    puts_(o, "\",\"target\":");
    int rc = 0;
    if (cmd->target)
        rc |= put_str(o, cmd->target, 1);
    else
        puts_(o, "null");
    puts_(o, ",\"argv\":");
    if (cmd->argv)
        rc |= put_list(o, cmd->prefix, cmd->argv, cmd->argc, 1);
    else
        puts_(o, "[\"\"]");
    puts_(o, ",\"orig_argv\":");
    rc |= put_list(o, config.python, argv + 1, argc - 1, 1);
    puts_(o, ",\"cwd\":");
    put_str(o, cwd, 0);
    puts_(o, ",\"env\":");
    put_env(o, coerced_lc_ctype, pythonpath);
    puts_(o, ",\"umask\":");
    put_int(o, (long long)mask);
    puts_(o, ",\"flags\":{\"u\":");
    puts_(o, cmd->u ? "true" : "false");
    puts_(o, ",\"B\":");
    puts_(o, cmd->B ? "true" : "false");
    puts_(o, ",\"i\":");
    puts_(o, cmd->i ? "true" : "false");
    puts_(o, ",\"q\":");
    puts_(o, cmd->q ? "true" : "false");
    puts_(o, ",\"W\":");
    rc |= put_list(o, NULL, (char **)cmd->W, cmd->nW, 1);
    puts_(o, "},\"stdio\":[\"pipe\",\"pipe\",\"pipe\"],\"ignored\":[");
    for (int k = 0; k < nignored; k++) {
        if (k)
            put(o, ",", 1);
        put_int(o, ignored[k]);
    }
    puts_(o, "],\"fds\":[");
    for (int k = 0; k < nextra; k++) {
        if (k)
            put(o, ",", 1);
        put_int(o, extra_fds[k]);
    }
    puts_(o, "]}");
    if (rc || o->full || o->len - 4 > MAX_FRAME)
        return -1;
    uint32_t size = (uint32_t)(o->len - 4);
    unsigned char header[4] = {(unsigned char)(size >> 24), (unsigned char)(size >> 16),
                               (unsigned char)(size >> 8), (unsigned char)size};
    memcpy(o->buf, header, 4);
    return 0;
}

/* ---- where the server listens (preloaded/paths.py) -------------------------------------- */

/* The locale encoding python reports when its filesystem encoding is utf-8 (a UTF-8 locale,
 * or the C locale: python's UTF-8 mode, after coercing LC_CTYPE to C.UTF-8 where it can);
 * NULL for any other locale, which the Python client handles. */
static const char *python_codeset(void) {
    static const char *const targets[] = {"C.UTF-8", "C.utf8", "UTF-8"}; /* _TARGET_LOCALES */
    const char *locale = setlocale(LC_CTYPE, "");
    if (!locale)
        return NULL;
    if (strcmp(locale, "C") != 0 && strcmp(locale, "POSIX") != 0) {
        const char *codeset = nl_langinfo(CODESET);
        return strcmp(codeset, "UTF-8") == 0 ? codeset : NULL;
    }
    utf8_mode = 1;
    const char *lc_all = getenv("LC_ALL");
    if (strcmp(locale, "C") == 0 && !(lc_all && *lc_all)) { /* _Py_CoerceLegacyLocale */
        for (size_t k = 0; k < COUNT(targets); k++) {
            if (setlocale(LC_CTYPE, targets[k]) && *nl_langinfo(CODESET)) {
                coerced_lc_ctype = targets[k];
                break;
            }
            setlocale(LC_CTYPE, "");
        }
    }
    return nl_langinfo(CODESET);
}

/* The socket path of this bundle's server in `out`; -1 when the Python client must decide
 * (no private runtime directory yet, a path too long, a locale python would coerce). */
static int socket_path(char *out, size_t size) {
    char dir[4096];
    const char *base = getenv("XDG_RUNTIME_DIR");
    int n;
    if (base && base[0] == '/') {
        size_t len = strlen(base);
        n = snprintf(dir, sizeof dir, "%s%spy-preload", base, base[len - 1] == '/' ? "" : "/");
    } else {
        n = snprintf(dir, sizeof dir, "/tmp/py-preload-%u", (unsigned)getuid());
    }
    if (n < 0 || (size_t)n >= sizeof dir)
        return -1;
    struct stat st;
    if (lstat(dir, &st) < 0 || !S_ISDIR(st.st_mode) || st.st_uid != getuid() ||
        (st.st_mode & 077))
        return -1; /* the Python client creates, repairs or refuses it */

    /* bundle_key: FNV-1a 64 of realpath NUL filesystem-encoding NUL locale-encoding, then
     * NUL utf8 in UTF-8 mode. */
    const char *codeset = python_codeset();
    if (!codeset)
        return -1;
    uint64_t h = 0xCBF29CE484222325ull;
    const char *parts[4] = {self_path, "utf-8", codeset, "utf8"};
    for (int k = 0; k < 3 + utf8_mode; k++) {
        if (k)
            h = (h ^ 0) * 0x100000001B3ull;
        for (const unsigned char *p = (const unsigned char *)parts[k]; *p; p++)
            h = (h ^ *p) * 0x100000001B3ull;
    }
    n = snprintf(out, size, "%s/%016llx.sock", dir, (unsigned long long)h);
    return n < 0 || (size_t)n >= size ? -1 : 0;
}

/* ---- the connection ---------------------------------------------------------------------- */

static int send_all(int sock, const char *buf, size_t len) {
    while (len) {
        ssize_t r = send(sock, buf, len, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        buf += r;
        len -= (size_t)r;
    }
    return 0;
}

/* The request with fds 0, 1, 2 and then the caller's others riding on its first byte
 * (wire.send). A peer that hung up before reading it is no error: its reply says why. */
static int send_request(int sock, const struct out *o) {
    int fds[MAX_FDS] = {0, 1, 2};
    size_t nfds = 3 + (size_t)nextra;
    memcpy(fds + 3, extra_fds, (size_t)nextra * sizeof fds[0]);
    union { /* aligned for the cmsghdr written into it */
        char buf[CMSG_SPACE(sizeof fds)];
        struct cmsghdr header;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {.iov_base = o->buf, .iov_len = o->len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = CMSG_SPACE(nfds * sizeof fds[0])};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(nfds * sizeof fds[0]);
    memcpy(CMSG_DATA(cm), fds, nfds * sizeof fds[0]);
    ssize_t sent;
    do
        sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    if (sent >= 0 && send_all(sock, o->buf + sent, o->len - (size_t)sent) == 0)
        return 0;
    return errno == EPIPE || errno == ECONNRESET ? 0 : -1;
}

/* A run its server left (connection.py Link): followed by a pidfd taken at "started". */
static struct {
    long long pid;
    int pidfd; /* -1: none (no keeper, or no pidfd_open): the run is lost with its server */
    int lost;  /* the server is gone: signals go to the program itself */
    char exit_path[sizeof(((struct sockaddr_un *)0)->sun_path) + 64];
} run = {0, -1, 0, ""};

static void signal_run(int signum) { /* connection.py Link._signal_run */
    if (signum == SIGINT || signum == SIGQUIT || signum == SIGSTOP || signum == SIGCONT ||
        signum == SIGTSTP || signum == SIGTERM || signum == SIGHUP) /* loop.GROUP_SIGNALS */
        killpg((pid_t)run.pid, signum); /* the run leads its own process group */
#ifdef SYS_pidfd_send_signal
    else
        syscall(SYS_pidfd_send_signal, run.pidfd, signum, NULL, 0);
#endif
}

static void send_signal(int sock, int signum) {
    if (run.lost) {
        signal_run(signum);
        return;
    }
    char body[64];
    int n = snprintf(body + 4, sizeof body - 4, "{\"signal\":%d}", signum);
    body[0] = body[1] = body[2] = 0;
    body[3] = (char)n;
    (void)send_all(sock, body, (size_t)n + 4); /* the server is gone: the status read says so */
}

/* Frames from the server (wire.FrameReader). */
static struct {
    unsigned char buf[4 + MAX_FRAME];
    size_t len;
} in;

/* A reply frame's fields the client acts on; values are kept only when they have the
 * types the server sends. */
struct reply {
    int started, has_exit, has_signal, has_error, cold, has_parent_signal, has_keeper;
    long long exit, signal, parent_signal, pid, keeper;
    char error[1024];
};

/* ---- a JSON reader for the replies (one flat object; nested values are skipped) ---------- */

struct scan {
    const unsigned char *p, *end;
};

static void ws(struct scan *s) {
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

static int hex4(const unsigned char *p, unsigned *v) {
    *v = 0;
    for (int k = 0; k < 4; k++) {
        unsigned c = p[k], d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if ((c | 32) >= 'a' && (c | 32) <= 'f')
            d = (c | 32) - 'a' + 10;
        else
            return -1;
        *v = *v << 4 | d;
    }
    return 0;
}

static void utf8_put(char *out, size_t size, size_t *len, unsigned c) {
    char b[4];
    size_t n;
    if (c < 0x80)
        b[0] = (char)c, n = 1;
    else if (c < 0x800)
        b[0] = (char)(0xC0 | c >> 6), b[1] = (char)(0x80 | (c & 63)), n = 2;
    else if (c < 0x10000)
        b[0] = (char)(0xE0 | c >> 12), b[1] = (char)(0x80 | (c >> 6 & 63)),
        b[2] = (char)(0x80 | (c & 63)), n = 3;
    else
        b[0] = (char)(0xF0 | c >> 18), b[1] = (char)(0x80 | (c >> 12 & 63)),
        b[2] = (char)(0x80 | (c >> 6 & 63)), b[3] = (char)(0x80 | (c & 63)), n = 4;
    if (*len + n < size) {
        memcpy(out + *len, b, n);
        *len += n;
    }
}

/* A JSON string at s->p; its text (UTF-8, truncated to fit) into out when out is not NULL. */
static int scan_string(struct scan *s, char *out, size_t size) {
    size_t len = 0;
    if (s->p >= s->end || *s->p != '"')
        return -1;
    s->p++;
    while (s->p < s->end && *s->p != '"') {
        unsigned c = *s->p++;
        if (c < 0x20)
            return -1;
        if (c == '\\') {
            if (s->p >= s->end)
                return -1;
            c = *s->p++;
            if (c == 'u') {
                if (s->end - s->p < 4 || hex4(s->p, &c) < 0)
                    return -1;
                s->p += 4;
                unsigned lo;
                if (c >= 0xD800 && c < 0xDC00 && s->end - s->p >= 6 && s->p[0] == '\\' &&
                    s->p[1] == 'u' && hex4(s->p + 2, &lo) == 0 && lo >= 0xDC00 && lo < 0xE000) {
                    c = 0x10000 + ((c - 0xD800) << 10) + (lo - 0xDC00);
                    s->p += 6;
                }
                if (c >= 0xD800 && c < 0xE000)
                    c = '?'; /* a lone surrogate cannot be printed */
            } else {
                const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
                const char *at = strchr(from, (int)c);
                if (!c || !at)
                    return -1;
                c = (unsigned char)to[at - from];
            }
            if (out)
                utf8_put(out, size, &len, c);
        } else if (out && len + 1 < size) {
            out[len++] = (char)c;
        }
    }
    if (s->p >= s->end)
        return -1;
    s->p++;
    if (out)
        out[len] = '\0';
    return 0;
}

static int scan_number(struct scan *s, long long *value, int *integer) {
    const unsigned char *start = s->p;
    *integer = 1;
    if (s->p < s->end && *s->p == '-')
        s->p++;
    if (s->p >= s->end || *s->p < '0' || *s->p > '9')
        return -1;
    if (*s->p == '0')
        s->p++;
    else
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
            s->p++;
    if (s->p < s->end && *s->p == '.') {
        *integer = 0;
        if (++s->p >= s->end || *s->p < '0' || *s->p > '9')
            return -1;
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
            s->p++;
    }
    if (s->p < s->end && (*s->p | 32) == 'e') {
        *integer = 0;
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-'))
            s->p++;
        if (s->p >= s->end || *s->p < '0' || *s->p > '9')
            return -1;
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
            s->p++;
    }
    if (*integer) {
        char num[24];
        size_t n = (size_t)(s->p - start);
        if (n >= sizeof num) {
            *integer = 0; /* too big for the statuses the server sends */
            return 0;
        }
        memcpy(num, start, n);
        num[n] = '\0';
        *value = strtoll(num, NULL, 10);
    }
    return 0;
}

static int skip_value(struct scan *s, int depth);

static int skip_container(struct scan *s, int depth, char close) {
    s->p++;
    ws(s);
    if (s->p < s->end && *s->p == close) {
        s->p++;
        return 0;
    }
    for (;;) {
        if (close == '}') {
            if (scan_string(s, NULL, 0) < 0)
                return -1;
            ws(s);
            if (s->p >= s->end || *s->p++ != ':')
                return -1;
            ws(s);
        }
        if (skip_value(s, depth + 1) < 0)
            return -1;
        ws(s);
        if (s->p >= s->end)
            return -1;
        if (*s->p == close) {
            s->p++;
            return 0;
        }
        if (*s->p++ != ',')
            return -1;
        ws(s);
    }
}

static int skip_value(struct scan *s, int depth) {
    static const char *const words[] = {"true", "false", "null"};
    if (depth > 64 || s->p >= s->end)
        return -1;
    if (*s->p == '"')
        return scan_string(s, NULL, 0);
    if (*s->p == '{' || *s->p == '[')
        return skip_container(s, depth, *s->p == '{' ? '}' : ']');
    for (size_t k = 0; k < COUNT(words); k++) {
        size_t n = strlen(words[k]);
        if ((size_t)(s->end - s->p) >= n && memcmp(s->p, words[k], n) == 0) {
            s->p += n;
            return 0;
        }
    }
    long long v;
    int integer;
    return scan_number(s, &v, &integer);
}

/* One reply object; -1 when it is no valid JSON object. */
static int parse_reply(const unsigned char *body, size_t size, struct reply *r) {
    struct scan s = {body, body + size};
    memset(r, 0, sizeof *r);
    ws(&s);
    if (s.p >= s.end || *s.p != '{')
        return -1;
    s.p++;
    ws(&s);
    if (s.p < s.end && *s.p == '}')
        s.p++;
    else
        for (;;) {
            char key[16];
            if (scan_string(&s, key, sizeof key) < 0)
                return -1;
            ws(&s);
            if (s.p >= s.end || *s.p++ != ':')
                return -1;
            ws(&s);
            const unsigned char *value = s.p;
            int *present = strcmp(key, "started") == 0  ? &r->started
                           : strcmp(key, "exit") == 0   ? &r->has_exit
                           : strcmp(key, "signal") == 0 ? &r->has_signal
                           : strcmp(key, "error") == 0  ? &r->has_error
                           : strcmp(key, "cold") == 0   ? &r->cold
                           : strcmp(key, "parent_signal") == 0 ? &r->has_parent_signal
                           : strcmp(key, "keeper") == 0        ? &r->has_keeper
                                                               : NULL;
            long long *number = present == &r->has_exit            ? &r->exit
                                : present == &r->has_signal        ? &r->signal
                                : present == &r->has_parent_signal ? &r->parent_signal
                                : present == &r->started           ? &r->pid
                                : present == &r->has_keeper        ? &r->keeper
                                                                   : NULL;
            if (present)
                *present = 1;
            if (present == &r->has_error && s.p < s.end && *s.p == '"') {
                if (scan_string(&s, r->error, sizeof r->error) < 0)
                    return -1;
            } else if (number && s.p < s.end && (*s.p == '-' || (*s.p >= '0' && *s.p <= '9'))) {
                int integer;
                if (scan_number(&s, number, &integer) < 0)
                    return -1;
                if (!integer)
                    *present = 2; /* not an int: a bad reply (a "started" without a pid) */
            } else {
                if (skip_value(&s, 0) < 0)
                    return -1;
                if (number)
                    *present = 2;
                if (present == &r->has_error)
                    snprintf(r->error, sizeof r->error, "%.*s", (int)(s.p - value), value);
            }
            ws(&s);
            if (s.p >= s.end)
                return -1;
            if (*s.p == '}') {
                s.p++;
                break;
            }
            if (*s.p++ != ',')
                return -1;
            ws(&s);
        }
    ws(&s);
    return s.p == s.end ? 0 : -1;
}

/* The next complete frame from `in` into *r: 1, 0 when more bytes are needed, -1 on a bad
 * frame (its reason in `why`). */
static int next_frame(struct reply *r, char *why, size_t whysize) {
    if (in.len < 4)
        return 0;
    uint32_t size = (uint32_t)in.buf[0] << 24 | (uint32_t)in.buf[1] << 16 |
                    (uint32_t)in.buf[2] << 8 | in.buf[3];
    if (size > MAX_FRAME) {
        snprintf(why, whysize, "frame of %u bytes exceeds %u", size, MAX_FRAME);
        return -1;
    }
    if (in.len < 4 + (size_t)size)
        return 0;
    for (uint32_t k = 0; k < size;) {
        unsigned c;
        size_t n = utf8_seq(in.buf + 4 + k, &c);
        if (n == 0 || n > size - k) {
            snprintf(why, whysize, "frame is not UTF-8");
            return -1;
        }
        k += (uint32_t)n;
    }
    int rc = parse_reply(in.buf + 4, size, r);
    memmove(in.buf, in.buf + 4 + size, in.len - 4 - size);
    in.len -= 4 + (size_t)size;
    if (rc < 0) {
        snprintf(why, whysize, "invalid JSON");
        return -1;
    }
    return 1;
}

/* Read more bytes from the server: >0, 0 at end of stream, -1 on an error. */
static ssize_t fill(int sock) {
    ssize_t r;
    size_t room = sizeof in.buf - in.len;
    do
        r = recv(sock, in.buf + in.len, room < 65536 ? room : 65536, 0);
    while (r < 0 && errno == EINTR);
    if (r > 0)
        in.len += (size_t)r;
    return r;
}

/* ---- signals (preloaded/client/signals.py) ----------------------------------------------- */

static int wake_pipe[2] = {-1, -1};
static int parent_fd = -1; /* a Jupyter kernel's launcher, watched (follow_jupyter) */
static struct sigaction previous[65];
/* The client's handlers: FORWARDED, then Ctrl-Z and SIGCONT (forwarded as well). */
static const int CAUGHT[] = {SIGINT,  SIGTERM, SIGHUP,  SIGQUIT,
                             SIGUSR1, SIGUSR2, SIGTSTP, SIGCONT};
static int handled[COUNT(CAUGHT)], nhandled;
static int tstp_ignored; /* the caller ignores SIGTSTP: forward it, never suspend */

static void on_signal(int signum) { /* only wakes the loop, like signal.set_wakeup_fd */
    int saved = errno;
    unsigned char b = (unsigned char)signum;
    ssize_t r = write(wake_pipe[1], &b, 1);
    (void)r; /* a full pipe drops it, as python's wakeup fd does */
    errno = saved;
}

static int is_ignored(int signum) {
    struct sigaction sa;
    return sigaction(signum, NULL, &sa) == 0 && sa.sa_handler == SIG_IGN;
}

static void install(int signum) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(signum, &sa, NULL);
}

/* Handlers for the forwarded signals, SIGTSTP and SIGCONT, those the caller ignores too: the
 * child starts with them ignored, as python would, but a handler the program installs must
 * still get them (signals.py, Signals). */
static int install_handlers(void) {
    if (pipe2(wake_pipe, O_NONBLOCK | O_CLOEXEC) < 0)
        return -1;
    tstp_ignored = is_ignored(SIGTSTP);
    for (size_t k = 0; k < COUNT(CAUGHT); k++) {
        int signum = CAUGHT[k];
        sigaction(signum, NULL, &previous[signum]);
        install(signum);
        handled[nhandled++] = signum;
    }
    return 0;
}

/* The run did not start: put the handlers back; forwarded signals that came meanwhile act
 * now (they end this process as they would have ended the Python client). */
static void restore_handlers(void) {
    unsigned char pending[64];
    ssize_t n = read(wake_pipe[0], pending, sizeof pending);
    for (int k = 0; k < nhandled; k++)
        sigaction(handled[k], &previous[handled[k]], NULL);
    for (ssize_t k = 0; k < n; k++)
        for (size_t f = 0; f < COUNT(FORWARDED); f++)
            if (pending[k] == FORWARDED[f])
                kill(getpid(), pending[k]);
    close(wake_pipe[0]);
    close(wake_pipe[1]);
}

/* Ctrl-Z: stop the child, then ourselves; the SIGCONT handler has the child continue. */
static void suspend(int sock) {
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    send_signal(sock, SIGSTOP);
    sigaction(SIGTSTP, &dfl, NULL);
    kill(getpid(), SIGTSTP);
    install(SIGTSTP); /* the SIGCONT that continued us is forwarded from the wake pipe */
}

/* ---- the end: mirror the child's status (run.py exit_like) ------------------------------- */

static void exit_like_signal(long long value) {
    if (value > 0 && value < 65) {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction((int)value, &dfl, NULL);
        kill(getpid(), (int)value);
    }
    _exit((int)(((unsigned long long)value + 128) & 0xFF)); /* os._exit(128 + value) */
}

static void fail(const char *message, const char *detail) {
    char line[1200];
    int n = snprintf(line, sizeof line, "py-preload: %s%s\n", message, detail);
    /* The Python client's write raises there, and its exit cannot flush stderr: status 120. */
    _exit(last_words(line, n < (int)sizeof line ? n : (int)sizeof line - 1) ? 120 : 1);
}

/* The buffered frames: end like the child once its status is there; return if none is. */
static void act_on_frames(void) {
    struct reply r;
    char why[128];
    int rc;
    while ((rc = next_frame(&r, why, sizeof why)) == 1) {
        /* The program signalled its parent (the server, as the kernel sees it): python's
         * parent would have been ours (connection.py signal_parent). */
        if (r.has_parent_signal == 1 && r.parent_signal > 0 && r.parent_signal < 65) {
            kill(getppid(), (int)r.parent_signal);
            continue;
        }
        if (r.has_exit == 1)
            _exit((int)((unsigned long long)r.exit & 0xFF));
        if (r.has_signal == 1)
            exit_like_signal(r.signal);
        if (r.has_exit || r.has_signal)
            fail("bad reply from the server: ", "a status that is not an integer");
        if (r.has_error)
            fail(r.error, "");
    }
    if (rc < 0)
        fail("bad reply from the server: ", why);
}

/* "started": take the program's pidfd now, before its pid could be reused, in case the server
 * dies during the run (connection.py Link). */
static void take_pidfd(const struct reply *first, const char *sock_path) {
#ifdef SYS_pidfd_open
    size_t len = strlen(sock_path);
    if (first->started != 1 || first->has_keeper != 1 || first->pid <= 0 ||
        first->pid > INT32_MAX || len < 5)
        return;
    run.pid = first->pid;
    run.pidfd = (int)syscall(SYS_pidfd_open, (pid_t)run.pid, 0);
    snprintf(run.exit_path, sizeof run.exit_path, "%.*s.exit.%lld.%lld", (int)(len - 5), sock_path,
             first->keeper, run.pid); /* paths.exit_file: the socket path without ".sock" */
#else
    (void)first;
    (void)sock_path;
#endif
}

/* The program ended after its server: its status as its keeper published it. */
static void exit_like_published(void) {
    struct timespec pause = {0, 2000000};
    for (int tries = 0; tries < 1000; tries++) { /* connection.py EXIT_FILE_WAIT: 2 s */
        char text[32];
        int fd = open(run.exit_path, O_RDONLY | O_CLOEXEC);
        ssize_t n = fd < 0 ? -1 : read(fd, text, sizeof text - 1);
        if (fd >= 0)
            close(fd);
        if (n > 0) {
            char *end;
            text[n] = 0;
            long long code = strtoll(text, &end, 10);
            if (end != text && *end == 0) {
                unlink(run.exit_path);
                if (code < 0)
                    exit_like_signal(-code);
                _exit((int)(code & 0xFF));
            }
        }
        nanosleep(&pause, NULL);
    }
    fail("lost the server during the run", "");
}

/* The signals the handlers wrote to the wake pipe: Ctrl-Z suspends, the rest go to the run
   (through the server, or straight to the program once the server is gone: send_signal). */
static void forward_wakeups(int sock) {
    unsigned char signums[64];
    ssize_t n = read(wake_pipe[0], signums, sizeof signums);
    for (ssize_t k = 0; k < n; k++) {
        if (signums[k] == SIGTSTP && !tstp_ignored)
            suspend(sock);
        else
            send_signal(sock, signums[k]);
    }
}

/* The server is gone, the program goes on: forward signals to it until it ends. */
static void follow_run(int sock) {
    run.lost = 1;
    for (;;) {
        struct pollfd fds[2] = {{.fd = run.pidfd, .events = POLLIN},
                                {.fd = wake_pipe[0], .events = POLLIN}};
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            fail("lost the server during the run", "");
        }
        if (fds[1].revents)
            forward_wakeups(sock);
        if (fds[0].revents)
            exit_like_published();
    }
}

/* After "started": forward signals until the child's status arrives, then mirror it. */
static void wait_for_status(int sock) {
    for (;;) {
        act_on_frames();
        struct pollfd fds[3] = {{.fd = sock, .events = POLLIN},
                                {.fd = wake_pipe[0], .events = POLLIN},
                                {.fd = parent_fd, .events = POLLIN}}; /* -1: not watched */
        if (poll(fds, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            fail("lost the server during the run", "");
        }
        if (fds[2].revents)
            _exit(1); /* ipykernel's os._exit(1); the server then ends the child (run.py) */
        if (fds[1].revents)
            forward_wakeups(sock);
        if (fds[0].revents && fill(sock) <= 0) {
            act_on_frames();
            if (run.pidfd >= 0)
                follow_run(sock);
            fail("lost the server during the run", "");
        }
    }
}

/* ---- main -------------------------------------------------------------------------------- */

static int stdio_is_pipes(void) {
    struct stat st;
    for (int fd = 0; fd < 3; fd++)
        if (isatty(fd) || fstat(fd, &st) < 0)
            return 0;
    return 1;
}

static char request_buf[4 + MAX_FRAME + 1];

/* A Jupyter kernel ends when the process that launched it dies: ipykernel polls getppid()
   against JPY_PARENT_PID. A warm kernel's parent is the server, so this client (the process
   Jupyter launched) keeps that watch, on a pidfd of its parent, as starter.py's follow_jupyter
   does (whatever Jupyter's signal dispositions): wait_for_status ends the run when it becomes
   readable. Only when JPY_PARENT_PID is our parent (a process a notebook starts inherits the
   variable but has another parent). The pidfd is close-on-exec: the Python starter or a cold
   kernel (python's own ipykernel) watch for themselves. */
static void follow_jupyter(void) {
#ifdef __linux__
    const char *jupyter = getenv("JPY_PARENT_PID");
    char parent[24];
    snprintf(parent, sizeof parent, "%ld", (long)getppid());
    if (!jupyter || strcmp(jupyter, parent) != 0) /* the same string, as starter.py compares */
        return;
    int fd = (int)syscall(SYS_pidfd_open, (pid_t)getppid(), 0);
    if (fd < 0)
        return; /* no pidfd (Linux < 5.3): the kernel outlives Jupyter */
    snprintf(parent, sizeof parent, "%ld", (long)getppid());
    if (strcmp(jupyter, parent) != 0)
        _exit(1); /* gone before the watch was set: as ipykernel's poller would */
    parent_fd = fd;
#endif
}

/* Once the run started warm: NUL out the program's arguments in this process's own command
 * line, which the child now shows as python would (preloaded/client/cmdline.py says why:
 * pgrep -f and pkill -f must find the program's process only). ps drops the trailing NULs. */
static void hide_arguments(int argc, char **argv) {
    if (argc < 2)
        return;
    for (int i = 2; i < argc; i++)
        if (argv[i] != argv[i - 1] + strlen(argv[i - 1]) + 1)
            return; /* not the kernel's contiguous argv area: leave it alone */
    char *end = argv[argc - 1] + strlen(argv[argc - 1]);
    memset(argv[1], 0, (size_t)(end - argv[1]));
}

int main(int argc, char **argv) {
    follow_jupyter();
    load_config();
    if (argc < 1 || !stdio_is_pipes() || env_is_cold())
        exec_python(argv);
    struct command cmd;
    if (parse_args(argc, argv, &cmd) < 0)
        exec_python(argv);

    char sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    char cwd[4097];
    if (socket_path(sock_path, sizeof sock_path) < 0 || !getcwd(cwd, sizeof cwd))
        exec_python(argv);

    char pythonpath[8192];
    const char *pp = NULL;
    if (config.overlay[0]) { /* starter.py with_overlay: the caller's entries, then the overlay */
        const char *old = env_get("PYTHONPATH");
        int n;
        if (!old || !*old)
            n = snprintf(pythonpath, sizeof pythonpath, "%s", config.overlay);
        else if (path_has(old, config.overlay))
            n = snprintf(pythonpath, sizeof pythonpath, "%s", old);
        else
            n = snprintf(pythonpath, sizeof pythonpath, "%s:%s", old, config.overlay);
        if (n < 0 || (size_t)n >= sizeof pythonpath)
            exec_python(argv);
        pp = pythonpath;
    }

    int ignored[COUNT(INHERITABLE)], nignored = 0;
    for (size_t k = 0; k < COUNT(INHERITABLE); k++)
        if (is_ignored(INHERITABLE[k]))
            ignored[nignored++] = INHERITABLE[k];

    struct out o = {request_buf, 0, sizeof request_buf, 0};
    if (list_caller_fds() < 0 ||
        build_request(&o, &cmd, argc, argv, cwd, pp, ignored, nignored) < 0)
        exec_python(argv);

    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, sock_path, strlen(sock_path));
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
        exec_python(argv); /* no server yet (the Python client starts it), or any error */

    if (install_handlers() < 0)
        exec_python(argv);
    struct reply first;
    char why[128];
    int rc = send_request(sock, &o) < 0 ? -1 : 0;
    while (rc == 0 && (rc = next_frame(&first, why, sizeof why)) == 0)
        rc = fill(sock) > 0 ? 0 : -1;
    if (rc == 1 && first.started) {
        take_pidfd(&first, sock_path);
        hide_arguments(argc, argv);
        wait_for_status(sock);
        return 1; /* not reached */
    }
    close(sock);
    restore_handlers();
    if (rc == 1 && first.cold && !config.overlay[0])
        exec_cold(argv); /* the server says python must run it (the reason is in its log) */
    /* Stale, refused, or no answer: the Python client retries, starts a server or says why;
     * with an overlay, its cold run checks that the overlay is installed first. */
    exec_python(argv);
    return 127;
}
