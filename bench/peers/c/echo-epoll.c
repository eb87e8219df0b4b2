/* A plain C epoll echo server: the readiness floor that echoport's epoll backend is held to.
 *
 * One thread, level-triggered, non-blocking. A readable socket is read (up to 64 KiB) and
 * the bytes written straight back; what the socket does not take is kept, reading stops,
 * and the socket waits for EPOLLOUT. TCP_NODELAY on every connection, like echoport.
 *
 * usage: echo-epoll [PORT]      (default 0: an ephemeral port on 127.0.0.1)
 * prints "listening on 127.0.0.1:PORT" on stderr.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536
#define MAXEV 1024

struct conn {
	char *pending; /* bytes read and not yet written back */
	size_t off, len;
};

static struct conn *conns; /* indexed by descriptor */
static size_t nconns;
static char buf[BUF];

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void drop_conn(int ep, int fd)
{
	epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
	free(conns[fd].pending);
	memset(&conns[fd], 0, sizeof conns[fd]);
	close(fd);
}

/* Writes what is pending; returns 1 when all of it is gone, 0 when the socket is full,
 * -1 on error. */
static int flush(int fd)
{
	struct conn *c = &conns[fd];
	while (c->off < c->len) {
		ssize_t n = send(fd, c->pending + c->off, c->len - c->off, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return errno == EAGAIN ? 0 : -1;
		}
		c->off += (size_t)n;
	}
	c->off = c->len = 0;
	return 1;
}

static void on_readable(int ep, int fd)
{
	ssize_t n = recv(fd, buf, BUF, 0);
	if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
		drop_conn(ep, fd);
		return;
	}
	if (n < 0)
		return;
	ssize_t w = send(fd, buf, (size_t)n, MSG_NOSIGNAL);
	if (w == n)
		return;
	if (w < 0 && errno != EAGAIN && errno != EINTR) {
		drop_conn(ep, fd);
		return;
	}
	if (w < 0)
		w = 0;
	/* The socket is full: keep the rest and wait until it can be written. */
	struct conn *c = &conns[fd];
	c->pending = realloc(c->pending, (size_t)(n - w));
	if (!c->pending)
		die("realloc");
	memcpy(c->pending, buf + w, (size_t)(n - w));
	c->off = 0;
	c->len = (size_t)(n - w);
	struct epoll_event ev = { .events = EPOLLOUT, .data.fd = fd };
	epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
}

int main(int argc, char **argv)
{
	int port = argc > 1 ? atoi(argv[1]) : 0;
	int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (lfd < 0)
		die("socket");
	int one = 1;
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	setsockopt(lfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port) };
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0)
		die("bind");
	if (listen(lfd, 4096) < 0)
		die("listen");
	socklen_t alen = sizeof a;
	getsockname(lfd, (struct sockaddr *)&a, &alen);
	fprintf(stderr, "listening on 127.0.0.1:%d\n", ntohs(a.sin_port));

	nconns = 65536;
	conns = calloc(nconns, sizeof *conns);
	int ep = epoll_create1(EPOLL_CLOEXEC);
	if (!conns || ep < 0)
		die("setup");
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = lfd };
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	struct epoll_event evs[MAXEV];
	for (;;) {
		int n = epoll_wait(ep, evs, MAXEV, -1);
		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if (fd == lfd) {
				int c;
				while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
					if ((size_t)c >= nconns) {
						close(c);
						continue;
					}
					setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
					struct epoll_event cev = { .events = EPOLLIN, .data.fd = c };
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
				}
				continue;
			}
			if (evs[i].events & EPOLLOUT) {
				int r = flush(fd);
				if (r < 0) {
					drop_conn(ep, fd);
				} else if (r > 0) {
					struct epoll_event cev = { .events = EPOLLIN, .data.fd = fd };
					epoll_ctl(ep, EPOLL_CTL_MOD, fd, &cev);
				}
			} else if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
				on_readable(ep, fd);
			}
		}
	}
}
