/* Benchmark workload: N syscalls in a tight loop, one JSON line of results.
 *
 *   workload open_unw PATH N         open+close of a file nobody watches
 *   workload read_wat PATH N         open+read+close (a watched key)
 *   workload getpid N                a syscall that is not an open
 *   workload hammer PATH N PROCS     PROCS processes share N open+close
 *   workload paced PATH RATE SECS OUT  opens at RATE/s; OUT gets the
 *                                    CLOCK_MONOTONIC ns taken before each
 *   workload race PATH SECS OUT      open+fstat+read+close loop; OUT gets
 *                                    "ts_ns ino" per open
 *
 * Timestamps are CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns(), so the
 * caller can compare them with the kernel's and its own time.monotonic_ns().
 * getpid goes through syscall(2): glibc caches nothing here, but be explicit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void die(const char *what, const char *arg)
{
	fprintf(stderr, "workload: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
	exit(2);
}

static long parse_pos(const char *s, const char *name)
{
	char *end;
	long v = strtol(s, &end, 10);
	if (*s == '\0' || *end != '\0' || v <= 0) {
		fprintf(stderr, "workload: %s must be a positive integer, got '%s'\n", name, s);
		exit(2);
	}
	return v;
}

static char buf[4096];

static void open_close(const char *path, int do_read)
{
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		die("open", path);
	if (do_read && read(fd, buf, sizeof(buf)) < 0)
		die("read", path);
	close(fd);
}

/* Warm up with a tenth of the loop (page cache, dentry cache, branch
 * predictors), then time the whole loop once: per-op clock reads would
 * cost as much as getpid itself. */
static void loop_opens(const char *mode, const char *path, long n, int do_read)
{
	long i;
	uint64_t t0, t1;
	for (i = 0; i < n / 10 + 1; i++)
		open_close(path, do_read);
	t0 = now_ns();
	for (i = 0; i < n; i++)
		open_close(path, do_read);
	t1 = now_ns();
	printf("{\"mode\":\"%s\",\"n\":%ld,\"pid\":%d,\"elapsed_ns\":%llu,\"ns_per_op\":%.2f}\n",
	       mode, n, getpid(), (unsigned long long)(t1 - t0), (double)(t1 - t0) / n);
}

static void loop_getpid(long n)
{
	long i;
	uint64_t t0, t1;
	for (i = 0; i < n / 10 + 1; i++)
		syscall(SYS_getpid);
	t0 = now_ns();
	for (i = 0; i < n; i++)
		syscall(SYS_getpid);
	t1 = now_ns();
	printf("{\"mode\":\"getpid\",\"n\":%ld,\"pid\":%d,\"elapsed_ns\":%llu,\"ns_per_op\":%.2f}\n",
	       n, getpid(), (unsigned long long)(t1 - t0), (double)(t1 - t0) / n);
}

static void hammer(const char *path, long n, long procs)
{
	long p, i, share = n / procs;
	pid_t kids[64];
	uint64_t t0, t1;
	int failed = 0;
	if (procs > 64) {
		fprintf(stderr, "workload: at most 64 processes\n");
		exit(2);
	}
	t0 = now_ns();
	for (p = 0; p < procs; p++) {
		kids[p] = fork();
		if (kids[p] < 0)
			die("fork", NULL);
		if (kids[p] == 0) {
			for (i = 0; i < share; i++)
				open_close(path, 0);
			_exit(0);
		}
	}
	for (p = 0; p < procs; p++) {
		int st;
		if (waitpid(kids[p], &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
			failed = 1;
	}
	t1 = now_ns();
	if (failed) {
		fprintf(stderr, "workload: a hammer process failed\n");
		exit(2);
	}
	printf("{\"mode\":\"hammer\",\"n\":%ld,\"procs\":%ld,\"pid\":%d,\"pids\":[", share * procs,
	       procs, getpid());
	for (p = 0; p < procs; p++)
		printf("%s%d", p ? "," : "", kids[p]);
	printf("],\"elapsed_ns\":%llu,\"ops_per_s\":%.0f}\n", (unsigned long long)(t1 - t0),
	       (double)share * procs * 1e9 / (double)(t1 - t0));
}

static void paced(const char *path, long rate, long secs, const char *out)
{
	long n = rate * secs, i;
	uint64_t *ts = calloc(n, sizeof(*ts));
	uint64_t period = 1000000000ull / rate, start;
	struct timespec next;
	FILE *f;
	if (!ts)
		die("calloc", NULL);
	start = now_ns() + 1000000;
	for (i = 0; i < n; i++) {
		uint64_t at = start + i * period;
		next.tv_sec = at / 1000000000ull;
		next.tv_nsec = at % 1000000000ull;
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
			;
		ts[i] = now_ns();
		open_close(path, 1);
	}
	f = fopen(out, "w");
	if (!f)
		die("fopen", out);
	for (i = 0; i < n; i++)
		fprintf(f, "%llu\n", (unsigned long long)ts[i]);
	fclose(f);
	printf("{\"mode\":\"paced\",\"n\":%ld,\"rate\":%ld,\"pid\":%d}\n", n, rate, getpid());
}

static void race(const char *path, long secs, const char *out)
{
	size_t cap = 1 << 20, n = 0;
	uint64_t *ts = malloc(cap * sizeof(*ts)), *ino = malloc(cap * sizeof(*ino));
	uint64_t end = now_ns() + (uint64_t)secs * 1000000000ull;
	long failures = 0;
	FILE *f;
	if (!ts || !ino)
		die("malloc", NULL);
	while (n < cap) {
		uint64_t t = now_ns();
		struct stat st;
		int fd;
		if (t >= end)
			break;
		fd = open(path, O_RDONLY);
		if (fd < 0) {
			/* an update can remove the key for a moment: count it */
			failures++;
			continue;
		}
		if (fstat(fd, &st) < 0 || read(fd, buf, sizeof(buf)) < 0)
			die("fstat/read", path);
		close(fd);
		ts[n] = t;
		ino[n] = st.st_ino;
		n++;
		/* ~20k opens/s: dense enough to see a gap of 100 us */
		if (n % 16 == 0)
			usleep(500);
	}
	f = fopen(out, "w");
	if (!f)
		die("fopen", out);
	for (size_t i = 0; i < n; i++)
		fprintf(f, "%llu %llu\n", (unsigned long long)ts[i], (unsigned long long)ino[i]);
	fclose(f);
	printf("{\"mode\":\"race\",\"n\":%zu,\"failed_opens\":%ld,\"pid\":%d}\n", n, failures,
	       getpid());
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(mode, "open_unw") && argc == 4)
		loop_opens(mode, argv[2], parse_pos(argv[3], "N"), 0);
	else if (!strcmp(mode, "read_wat") && argc == 4)
		loop_opens(mode, argv[2], parse_pos(argv[3], "N"), 1);
	else if (!strcmp(mode, "getpid") && argc == 3)
		loop_getpid(parse_pos(argv[2], "N"));
	else if (!strcmp(mode, "hammer") && argc == 5)
		hammer(argv[2], parse_pos(argv[3], "N"), parse_pos(argv[4], "PROCS"));
	else if (!strcmp(mode, "paced") && argc == 6)
		paced(argv[2], parse_pos(argv[3], "RATE"), parse_pos(argv[4], "SECS"), argv[5]);
	else if (!strcmp(mode, "race") && argc == 5)
		race(argv[2], parse_pos(argv[3], "SECS"), argv[4]);
	else {
		fprintf(stderr, "usage: workload open_unw|read_wat PATH N | getpid N | "
				"hammer PATH N PROCS | paced PATH RATE SECS OUT | race PATH SECS OUT\n");
		return 2;
	}
	return 0;
}
