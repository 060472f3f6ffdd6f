/* faultshim: fail the Nth call of one file-system syscall, for scripts/faultcheck/faultcheck.py.
 *
 * Loaded with LD_PRELOAD. Interposes libc's wrappers of write, pwrite64, fsync, fdatasync, rename,
 * renameat, renameat2, unlink, unlinkat, mkdir, mkdirat, rmdir, open/openat (counted only with
 * O_CREAT or O_TRUNC: the "openat" kind), sync_file_range and ftruncate. Python's os module, SQLite's
 * unix VFS and ckptdb's ctypes sync_file_range (CDLL(None)) all call these wrappers.
 *
 * Only calls on paths under the root given to faultshim_start() (an absolute directory; for fd calls, the fd's path in
 * /proc/self/fd) are counted, and only between faultshim_start() and faultshim_stop(): the protocol
 * phase. Counters are global to the process (every thread), so "the Nth call" is one call, whatever
 * thread makes it (strace's when=N counts per thread). faultshim_arm(kind, n, errno) makes the Nth
 * counted call of that kind fail with errno without reaching the kernel; exactly once
 * (faultshim_arm_suffix: the Nth of those whose path ends with a suffix, for regression tests).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <stdlib.h>
#include <unistd.h>

enum {
    K_WRITE, K_PWRITE64, K_FSYNC, K_FDATASYNC, K_RENAME, K_RENAMEAT, K_RENAMEAT2, K_UNLINK,
    K_UNLINKAT, K_MKDIR, K_MKDIRAT, K_RMDIR, K_OPENAT, K_SYNC_FILE_RANGE, K_FTRUNCATE, K_N
};
static const char *kind_names[K_N] = {
    "write", "pwrite64", "fsync", "fdatasync", "rename", "renameat", "renameat2", "unlink",
    "unlinkat", "mkdir", "mkdirat", "rmdir", "openat", "sync_file_range", "ftruncate",
};

static volatile int active = 0;
static long counts[K_N];
static long seq = 0;
static int armed_kind = -1;
static long armed_n = 0;
static int armed_errno = 0;
static char armed_suffix[256];  /* "": every path; else only paths ending so count toward N */
static long armed_count = 0;
static volatile int fired = 0;
static long fired_seq = 0;
static char fired_path[PATH_MAX];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static char root[PATH_MAX];
static size_t root_len = 0;

const char *faultshim_kind_name(int k) { return (k >= 0 && k < K_N) ? kind_names[k] : NULL; }
int faultshim_kinds(void) { return K_N; }
long faultshim_count(int k) { return (k >= 0 && k < K_N) ? __atomic_load_n(&counts[k], __ATOMIC_SEQ_CST) : -1; }
long faultshim_seq(void) { return __atomic_load_n(&seq, __ATOMIC_SEQ_CST); }
int faultshim_fired(void) { return fired; }
long faultshim_fired_seq(void) { return fired_seq; }
const char *faultshim_fired_path(void) { return fired_path; }

void faultshim_start(const char *r) {
    pthread_mutex_lock(&mu);
    snprintf(root, sizeof root, "%s", r);
    root_len = strlen(root);
    while (root_len > 1 && root[root_len - 1] == '/') root[--root_len] = 0;
    memset(counts, 0, sizeof counts);
    seq = 0;
    fired = 0;
    fired_seq = 0;
    fired_path[0] = 0;
    active = 1;
    pthread_mutex_unlock(&mu);
}
void faultshim_stop(void) { active = 0; }
void faultshim_arm_suffix(int k, long n, int err, const char *suffix) {
    pthread_mutex_lock(&mu);
    armed_kind = k; armed_n = n; armed_errno = err; armed_count = 0;
    snprintf(armed_suffix, sizeof armed_suffix, "%s", suffix ? suffix : "");
    pthread_mutex_unlock(&mu);
}
void faultshim_arm(int k, long n, int err) { faultshim_arm_suffix(k, n, err, ""); }
void faultshim_disarm(void) { faultshim_arm(-1, 0, 0); }

static int ends_with(const char *p, const char *suffix) {
    size_t a = strlen(p), b = strlen(suffix);
    return a >= b && strcmp(p + a - b, suffix) == 0;
}

static int under_root(const char *p) {
    size_t n = root_len;
    if (!n || !p) return 0;
    return strncmp(p, root, n) == 0 && (p[n] == '/' || p[n] == 0);
}

static int fd_path(int fd, char *out, size_t len) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t r = readlink(link, out, len - 1);
    if (r < 0) return -1;
    out[r] = 0;
    return 0;
}

static void at_path(int dirfd, const char *p, char *out, size_t len) {
    out[0] = 0;
    if (!p) return;
    if (p[0] == '/') { snprintf(out, len, "%s", p); return; }
    char base[PATH_MAX];
    if (dirfd == AT_FDCWD) { if (!getcwd(base, sizeof base)) return; }
    else if (fd_path(dirfd, base, sizeof base) != 0) return;
    snprintf(out, len, "%s/%s", base, p);
}

/* 1: fail this call (errno set), 0: pass it on. */
static int decide(int kind, const char *path) {
    if (!active || !under_root(path)) return 0;
    pthread_mutex_lock(&mu);
    ++counts[kind];
    long s = ++seq;
    int fail = 0;
    if (!fired && kind == armed_kind && ends_with(path, armed_suffix)) fail = (++armed_count == armed_n);
    int err = armed_errno;
    if (fail) {
        fired = 1;
        fired_seq = s;
        snprintf(fired_path, sizeof fired_path, "%s", path);
    }
    pthread_mutex_unlock(&mu);
    if (fail) errno = err;
    return fail;
}

static int decide_fd(int kind, int fd) {
    if (!active) return 0;
    char p[PATH_MAX];
    if (fd_path(fd, p, sizeof p) != 0) return 0;
    return decide(kind, p);
}

static int decide_at(int kind, int dirfd, const char *path) {
    if (!active) return 0;
    char p[2 * PATH_MAX + 2];
    at_path(dirfd, path, p, sizeof p);
    return decide(kind, p);
}

#define REAL(ret, name, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) real_##name = (ret (*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void *buf, size_t n) {
    REAL(ssize_t, write, int, const void *, size_t);
    if (decide_fd(K_WRITE, fd)) return -1;
    return real_write(fd, buf, n);
}
ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    REAL(ssize_t, pwrite, int, const void *, size_t, off_t);
    if (decide_fd(K_PWRITE64, fd)) return -1;
    return real_pwrite(fd, buf, n, off);
}
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    REAL(ssize_t, pwrite64, int, const void *, size_t, off_t);
    if (decide_fd(K_PWRITE64, fd)) return -1;
    return real_pwrite64(fd, buf, n, off);
}
int fsync(int fd) {
    REAL(int, fsync, int);
    if (decide_fd(K_FSYNC, fd)) return -1;
    return real_fsync(fd);
}
int fdatasync(int fd) {
    REAL(int, fdatasync, int);
    if (decide_fd(K_FDATASYNC, fd)) return -1;
    return real_fdatasync(fd);
}
int rename(const char *a, const char *b) {
    REAL(int, rename, const char *, const char *);
    if (decide_at(K_RENAME, AT_FDCWD, a)) return -1;
    return real_rename(a, b);
}
int renameat(int da, const char *a, int db, const char *b) {
    REAL(int, renameat, int, const char *, int, const char *);
    if (decide_at(K_RENAMEAT, da, a)) return -1;
    return real_renameat(da, a, db, b);
}
int renameat2(int da, const char *a, int db, const char *b, unsigned int flags) {
    REAL(int, renameat2, int, const char *, int, const char *, unsigned int);
    if (decide_at(K_RENAMEAT2, da, a)) return -1;
    return real_renameat2(da, a, db, b, flags);
}
int unlink(const char *p) {
    REAL(int, unlink, const char *);
    if (decide_at(K_UNLINK, AT_FDCWD, p)) return -1;
    return real_unlink(p);
}
int unlinkat(int d, const char *p, int flags) {
    REAL(int, unlinkat, int, const char *, int);
    if (decide_at(K_UNLINKAT, d, p)) return -1;
    return real_unlinkat(d, p, flags);
}
int rmdir(const char *p) {
    REAL(int, rmdir, const char *);
    if (decide_at(K_RMDIR, AT_FDCWD, p)) return -1;
    return real_rmdir(p);
}
int mkdir(const char *p, mode_t m) {
    REAL(int, mkdir, const char *, mode_t);
    if (decide_at(K_MKDIR, AT_FDCWD, p)) return -1;
    return real_mkdir(p, m);
}
int mkdirat(int d, const char *p, mode_t m) {
    REAL(int, mkdirat, int, const char *, mode_t);
    if (decide_at(K_MKDIRAT, d, p)) return -1;
    return real_mkdirat(d, p, m);
}
int ftruncate(int fd, off_t len) {
    REAL(int, ftruncate, int, off_t);
    if (decide_fd(K_FTRUNCATE, fd)) return -1;
    return real_ftruncate(fd, len);
}
int ftruncate64(int fd, off_t len) {
    REAL(int, ftruncate64, int, off_t);
    if (decide_fd(K_FTRUNCATE, fd)) return -1;
    return real_ftruncate64(fd, len);
}
int sync_file_range(int fd, off_t off, off_t n, unsigned int flags) {
    REAL(int, sync_file_range, int, off_t, off_t, unsigned int);
    if (decide_fd(K_SYNC_FILE_RANGE, fd)) return -1;
    return real_sync_file_range(fd, off, n, flags);
}

#define CREATES(flags) (((flags) & (O_CREAT | O_TRUNC)) != 0)
#define OPEN_MODE(flags, mode) \
    mode_t mode = 0; \
    if ((flags) & (O_CREAT | O_TMPFILE)) { va_list ap; va_start(ap, flags); mode = va_arg(ap, mode_t); va_end(ap); }

int open(const char *p, int flags, ...) {
    OPEN_MODE(flags, mode);
    REAL(int, open, const char *, int, ...);
    if (CREATES(flags) && decide_at(K_OPENAT, AT_FDCWD, p)) return -1;
    return real_open(p, flags, mode);
}
int open64(const char *p, int flags, ...) {
    OPEN_MODE(flags, mode);
    REAL(int, open64, const char *, int, ...);
    if (CREATES(flags) && decide_at(K_OPENAT, AT_FDCWD, p)) return -1;
    return real_open64(p, flags, mode);
}
int openat(int d, const char *p, int flags, ...) {
    OPEN_MODE(flags, mode);
    REAL(int, openat, int, const char *, int, ...);
    if (CREATES(flags) && decide_at(K_OPENAT, d, p)) return -1;
    return real_openat(d, p, flags, mode);
}
int openat64(int d, const char *p, int flags, ...) {
    OPEN_MODE(flags, mode);
    REAL(int, openat64, int, const char *, int, ...);
    if (CREATES(flags) && decide_at(K_OPENAT, d, p)) return -1;
    return real_openat64(d, p, flags, mode);
}
int creat(const char *p, mode_t mode) {
    REAL(int, creat, const char *, mode_t);
    if (decide_at(K_OPENAT, AT_FDCWD, p)) return -1;
    return real_creat(p, mode);
}
int creat64(const char *p, mode_t mode) {
    REAL(int, creat64, const char *, mode_t);
    if (decide_at(K_OPENAT, AT_FDCWD, p)) return -1;
    return real_creat64(p, mode);
}
