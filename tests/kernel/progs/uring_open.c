/* Open a file N times through io_uring (IORING_OP_OPENAT or OPENAT2),
 * never through an open syscall; print {"pid":..,"opened":..}. */
#include <fcntl.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/openat2.h>

int main(int argc, char **argv)
{
	struct io_uring ring;
	struct io_uring_sqe *sqe;
	struct io_uring_cqe *cqe;
	struct open_how how = { .flags = O_RDONLY };
	int n, use2, opened = 0, i, rc;

	if (argc != 4) {
		fprintf(stderr, "usage: %s PATH COUNT openat|openat2\n", argv[0]);
		return 2;
	}
	n = atoi(argv[2]);
	use2 = strcmp(argv[3], "openat2") == 0;
	rc = io_uring_queue_init(8, &ring, 0);
	if (rc < 0) {
		fprintf(stderr, "io_uring_queue_init: %s\n", strerror(-rc));
		return 1;
	}
	for (i = 0; i < n; i++) {
		sqe = io_uring_get_sqe(&ring);
		if (use2)
			io_uring_prep_openat2(sqe, AT_FDCWD, argv[1], &how);
		else
			io_uring_prep_openat(sqe, AT_FDCWD, argv[1], O_RDONLY, 0);
		io_uring_submit(&ring);
		if (io_uring_wait_cqe(&ring, &cqe) < 0)
			return 1;
		if (cqe->res >= 0) {
			opened++;
			close(cqe->res);
		}
		io_uring_cqe_seen(&ring, cqe);
	}
	io_uring_queue_exit(&ring);
	printf("{\"pid\": %d, \"opened\": %d}\n", getpid(), opened);
	return 0;
}
