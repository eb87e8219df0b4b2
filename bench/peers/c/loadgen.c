/* A small load generator for measuring an echo server's CPU per echo.
 *
 * Open loop (RATE > 0): messages leave on a fixed schedule, RATE per second in all, dealt
 * round-robin over the connections, whether or not earlier echoes came back: the server is
 * offered a fixed load and its CPU per echo is what it costs to serve it.
 * Closed loop (RATE = 0): each connection keeps one message in flight: throughput.
 *
 * Every echoed byte is checked against what was sent on its connection; latency is taken
 * per message from its scheduled send time (so a late sender does not hide queueing).
 * Messages are paced in ticks of LOADGEN_TICK_US microseconds (default 50).
 *
 * usage: loadgen PORT CONNS SIZE SECONDS RATE
 * prints one line: sent= received= seconds= rate= mismatches= p50_us= p99_us= p999_us= max_us=
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RING 65536 /* messages in flight per connection, at most */
#define HIST 200000 /* 1 us buckets up to 200 ms */

struct conn {
	int fd;
	uint64_t want, sent, recvd; /* stream offsets in bytes */
	uint64_t *times;            /* scheduled send time of each message in flight */
	uint32_t head, tail;
};

static struct conn *cs;
static int nconn, size, ep;
static uint64_t hist[HIST + 1], mismatches, received_msgs, sent_msgs, latmax;
static int closed_loop;
static uint64_t end_ns;

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static inline uint8_t pattern(int c, uint64_t k)
{
	return (uint8_t)(c * 131 + k * 7 + (k >> 8));
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void flush(int i)
{
	struct conn *c = &cs[i];
	uint8_t buf[16384];
	while (c->sent < c->want) {
		size_t n = c->want - c->sent;
		if (n > sizeof buf)
			n = sizeof buf;
		for (size_t k = 0; k < n; k++)
			buf[k] = pattern(i, c->sent + k);
		ssize_t w = send(c->fd, buf, n, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return; /* EPOLLOUT (edge-triggered) says when to go on */
			die("send");
		}
		c->sent += (uint64_t)w;
	}
}

static void schedule(int i, uint64_t t)
{
	struct conn *c = &cs[i];
	if (c->tail - c->head >= RING) {
		fprintf(stderr, "loadgen: more than %d messages in flight on one connection\n", RING);
		exit(1);
	}
	c->times[c->tail++ % RING] = t;
	c->want += (uint64_t)size;
	sent_msgs++;
	flush(i);
}

static void on_readable(int i)
{
	struct conn *c = &cs[i];
	uint8_t buf[65536];
	for (;;) {
		ssize_t n = recv(c->fd, buf, sizeof buf, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			return;
		if (n <= 0) {
			fprintf(stderr, "loadgen: connection %d ended: %s\n", i, n ? strerror(errno) : "EOF");
			exit(1);
		}
		uint64_t now = now_ns();
		for (ssize_t k = 0; k < n; k++)
			mismatches += buf[k] != pattern(i, c->recvd + (uint64_t)k);
		uint64_t before = c->recvd / (uint64_t)size;
		c->recvd += (uint64_t)n;
		uint64_t after = c->recvd / (uint64_t)size;
		for (uint64_t m = before; m < after; m++) {
			/* A message may leave up to half a tick early: count that as no delay. */
			uint64_t due = c->times[c->head++ % RING];
			uint64_t lat = now > due ? (now - due) / 1000 : 0;
			hist[lat < HIST ? lat : HIST]++;
			if (lat > latmax)
				latmax = lat;
			received_msgs++;
			if (closed_loop && now < end_ns)
				schedule(i, now);
		}
	}
}

static uint64_t percentile(double p)
{
	uint64_t want = (uint64_t)(p * (double)received_msgs), seen = 0;
	for (int b = 0; b <= HIST; b++) {
		seen += hist[b];
		if (seen > want)
			return (uint64_t)b;
	}
	return HIST;
}

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: loadgen PORT CONNS SIZE SECONDS RATE (0: closed loop)\n");
		return 2;
	}
	int port = atoi(argv[1]);
	nconn = atoi(argv[2]);
	size = atoi(argv[3]);
	double secs = atof(argv[4]);
	double rate = atof(argv[5]);
	closed_loop = rate <= 0;
	if (nconn < 1 || size < 1 || secs <= 0)
		return 2;
	/* Pacing granularity: messages due within one tick leave together. A timer wake-up per
	 * message would cost the client more than the echo itself and saturate its core; a tick
	 * of 50 us (the kernel's default timer slack) sends ~8 messages per wake-up at 150k/s. */
	uint64_t tick = 50000;
	if (getenv("LOADGEN_TICK_US"))
		tick = (uint64_t)atoll(getenv("LOADGEN_TICK_US")) * 1000;

	cs = calloc((size_t)nconn, sizeof *cs);
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (!cs || ep < 0)
		die("setup");
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port) };
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	int one = 1;
	for (int i = 0; i < nconn; i++) {
		int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
			die("connect");
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		if (fcntl(fd, F_SETFL, O_NONBLOCK) < 0)
			die("fcntl");
		cs[i].fd = fd;
		cs[i].times = malloc(RING * sizeof(uint64_t));
		if (!cs[i].times)
			die("malloc");
		struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLET, .data.u32 = (uint32_t)i };
		epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
	}

	uint64_t t0 = now_ns();
	end_ns = t0 + (uint64_t)(secs * 1e9);
	uint64_t interval = closed_loop ? 0 : (uint64_t)(1e9 / rate);
	uint64_t next_due = t0;
	int rr = 0;
	if (closed_loop)
		for (int i = 0; i < nconn; i++)
			schedule(i, t0);
	struct epoll_event evs[1024];
	for (;;) {
		uint64_t now = now_ns();
		if (!closed_loop)
			while (next_due <= now + tick / 2 && next_due < end_ns) {
				schedule(rr, next_due);
				rr = (rr + 1) % nconn;
				next_due += interval;
			}
		if (now >= end_ns && (received_msgs == sent_msgs || now > end_ns + 3000000000u))
			break;
		uint64_t wait = 10000000; /* 10 ms */
		if (!closed_loop && next_due < end_ns) {
			wait = next_due > now ? next_due - now : 0;
			if (wait < tick)
				wait = tick;
		}
		struct timespec ts = { .tv_sec = (time_t)(wait / 1000000000u), .tv_nsec = (long)(wait % 1000000000u) };
		int n = epoll_pwait2(ep, evs, 1024, &ts, NULL);
		if (n < 0 && errno != EINTR)
			die("epoll_pwait2");
		for (int k = 0; k < n; k++) {
			int i = (int)evs[k].data.u32;
			if (evs[k].events & EPOLLOUT)
				flush(i);
			if (evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
				on_readable(i);
		}
	}
	double took = (double)(now_ns() - t0) / 1e9;
	printf("sent=%lu received=%lu seconds=%.3f rate=%.0f mismatches=%lu p50_us=%lu p99_us=%lu p999_us=%lu max_us=%lu\n",
	       sent_msgs, received_msgs, secs, (double)received_msgs / (took < secs ? took : secs), mismatches,
	       percentile(0.50), percentile(0.99), percentile(0.999), latmax);
	return received_msgs == sent_msgs && mismatches == 0 ? 0 : 1;
}
