// SPDX-License-Identifier: Apache-2.0
//
// Loopback acceleration for a sidecar's two loopback hops. Both ends of each hop sit in the
// pod's network namespace, so bytes written on one end can be queued straight onto the other
// end's receive queue (sockmap redirection), skipping the TCP/IP stack twice per write:
// segments, netfilter, the loopback device, softirq delivery and ACKs.
//
// Inbound: the sidecar delivers to its app from 127.0.0.6 / ::6 (mesh.md). The capture rules
// return those connections before any NAT, so both ends see each other's addresses exactly
// mirrored, and a mirrored pair in one namespace is one connection.
//
// Outbound, in namespaces the agent has enrolled: the app's connect() to anything but loopback,
// its own addresses and the excluded ports is sent to 127.0.0.1 / ::1 :<outbound port> here,
// where the sidecar listens — not NATed by the capture rules, so the ends mirror each other
// again — and the original destination is kept for the sidecar's SO_ORIGINAL_DST and the app's
// getpeername(). Connections the capture rules NAT are never paired: their ends disagree about
// the addresses.
//
// Addresses are compared as IPv6, IPv4 ones mapped (::ffff:a.b.c.d) — what a dual-stack socket
// sees — so an IPv4 socket and a dual-stack one at the two ends of a connection name it alike.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80 /* IP6T_SO_ORIGINAL_DST too */
#define LOCALHOST 0x7f000001 /* 127.0.0.1 */
#define MAX_ADDRS 8
#define MAX_EXCLUDED 16

/* Which end of which hop a socket is. */
enum end { IN_PROXY = 0, IN_APP = 1, OUT_PROXY = 2, OUT_APP = 3 };
enum decision { UNDECIDED = 0, REDIRECT = 1, PASS = 2 };
enum count { REDIRECTED = 0, PASSED = 1, PAIRED = 2, CONNECTS = 3, COUNTS = 4 };

/* An IPv6 address, or an IPv4 one mapped (::ffff:a.b.c.d); network byte order. */
struct addr {
	__u32 w[4];
};

/* One end of a sidecar ↔ app connection, named from the app's side. */
struct pair_key {
	__u64 netns;
	struct addr app_ip;
	__u32 app_port;   /* host byte order */
	__u32 proxy_port; /* host byte order */
	__u32 end;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct pair_key);
	__type(value, __u32);
} pairs SEC(".maps");

/* Per socket, whether its writes go to the peer's queue: decided on its first write and kept,
 * so a connection never mixes the two paths (bytes sent over TCP before the peer was paired
 * would otherwise be read after bytes redirected later). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u32);
} decided SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTS);
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");

/* An enrolled pod: what its capture rules say (ferrum-dp init-iptables). */
struct capture {
	__u32 proxy_uid;
	__u32 proxy_gid;
	__u32 outbound_port;              /* host byte order */
	__u32 addrs[MAX_ADDRS];           /* the pod's own IPv4 addresses, network order; 0 = none */
	struct addr addrs6[MAX_ADDRS];    /* its own IPv6 addresses (not ::1); :: = none */
	__u32 excluded[MAX_EXCLUDED];     /* destination ports never captured, host order; 0 = none */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64); /* network namespace cookie */
	__type(value, struct capture);
} enrolled SEC(".maps");

struct dst {
	struct addr ip;
	__u32 port; /* network byte order, low 16 bits */
};

/* Original destinations of redirected connects: by the app socket's cookie (for getpeername),
 * and by the app's address once it has one (for the sidecar's SO_ORIGINAL_DST). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct dst);
} dst_by_cookie SEC(".maps");

struct app_addr {
	__u64 netns;
	struct addr ip;
	__u32 port; /* host byte order */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct app_addr);
	__type(value, struct dst);
} dst_by_app SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&counts, &which);
	if (n)
		*n += 1;
}

static __always_inline void mapped(struct addr *a, __u32 ip4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0xffff);
	a->w[3] = ip4;
}

static __always_inline int is_mapped(const struct addr *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0xffff);
}

static __always_inline int same(const struct addr *a, const struct addr *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] && a->w[3] == b->w[3];
}

/* ::<low> (::1, ::6), or 127.0.0.<low> mapped. */
static __always_inline int is_local(const struct addr *a, __u32 low)
{
	if (is_mapped(a))
		return a->w[3] == bpf_htonl(0x7f000000 | low);
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == 0 && a->w[3] == bpf_htonl(low);
}

/* The sidecar's source towards its app. */
static __always_inline int is_source(const struct addr *a)
{
	return is_local(a, 6);
}

static __always_inline int is_localhost(const struct addr *a)
{
	return is_local(a, 1);
}

/* Whether the capture rules would send a connect to ip:port (host order port) to the sidecar. */
static __always_inline int captured(struct capture *c, const struct addr *ip, __u32 port)
{
	if (is_mapped(ip)) {
		if ((bpf_ntohl(ip->w[3]) >> 24) == 127)
			return 0;
#pragma unroll
		for (int i = 0; i < MAX_ADDRS; i++)
			if (c->addrs[i] == ip->w[3])
				return 0;
	} else {
		if (is_localhost(ip))
			return 0;
#pragma unroll
		for (int i = 0; i < MAX_ADDRS; i++)
			if (same(&c->addrs6[i], ip))
				return 0;
	}
#pragma unroll
	for (int i = 0; i < MAX_EXCLUDED; i++)
		if (c->excluded[i] == port)
			return 0;
	return 1;
}

/* Whether an enrolled pod's connect to ip:port (port in network order) goes to its sidecar
 * instead; if so, the original destination is kept by the socket's cookie. */
static __always_inline int redirected(struct bpf_sock_addr *ctx, const struct addr *ip, __u32 port,
				      __u32 *to_port)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct capture *c = bpf_map_lookup_elem(&enrolled, &netns);
	__u64 ids, cookie;
	struct dst original = {};

	if (!c || ctx->type != SOCK_STREAM)
		return 0;
	ids = bpf_get_current_uid_gid();
	if ((__u32)ids == c->proxy_uid || (__u32)(ids >> 32) == c->proxy_gid)
		return 0;
	if (!captured(c, ip, bpf_ntohs((__u16)port)))
		return 0;
	original.ip = *ip;
	original.port = port;
	cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&dst_by_cookie, &cookie, &original, BPF_ANY))
		return 0; /* not redirected: the capture rules take it */
	*to_port = bpf_htons((__u16)c->outbound_port);
	count(CONNECTS);
	return 1;
}

SEC("cgroup/connect4")
int redirect_outbound(struct bpf_sock_addr *ctx)
{
	struct addr ip;
	__u32 port;

	mapped(&ip, ctx->user_ip4);
	if (redirected(ctx, &ip, ctx->user_port, &port)) {
		ctx->user_ip4 = bpf_htonl(LOCALHOST);
		ctx->user_port = port;
	}
	return 1;
}

/* IPv6, and IPv4 dialled on a dual-stack socket (::ffff:a.b.c.d, Java's default): the latter's
 * packets are IPv4, which the IPv4 capture rules would take, so it goes to 127.0.0.1 mapped. */
SEC("cgroup/connect6")
int redirect_outbound6(struct bpf_sock_addr *ctx)
{
	struct addr ip = {{ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]}};
	__u32 port;

	if (!redirected(ctx, &ip, ctx->user_port, &port))
		return 1;
	if (is_mapped(&ip)) {
		ctx->user_ip6[3] = bpf_htonl(LOCALHOST);
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = port;
	return 1;
}

/* The app asking whom it is connected to gets the address it dialled (an IPv4 socket only
 * ever dialled an IPv4 one). */
SEC("cgroup/getpeername4")
int original_peer(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct dst *original = bpf_map_lookup_elem(&dst_by_cookie, &cookie);

	if (original) {
		ctx->user_ip4 = original->ip.w[3];
		ctx->user_port = original->port;
	}
	return 1;
}

SEC("cgroup/getpeername6")
int original_peer6(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct dst *original = bpf_map_lookup_elem(&dst_by_cookie, &cookie);

	if (original) {
		ctx->user_ip6[0] = original->ip.w[0];
		ctx->user_ip6[1] = original->ip.w[1];
		ctx->user_ip6[2] = original->ip.w[2];
		ctx->user_ip6[3] = original->ip.w[3];
		ctx->user_port = original->port;
	}
	return 1;
}

struct sockaddr_in4 {
	__u16 family;
	__u16 port;
	__u32 addr;
	__u8 zero[8];
};

struct sockaddr_in6 {
	__u16 family;
	__u16 port;
	__u32 flowinfo;
	__u32 addr[4];
	__u32 scope_id;
};

/* The sidecar's SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST (IPv6) on a connection redirected
 * at connect(): no NAT happened, so conntrack has nothing to say; the address the app dialled
 * is the answer. */
SEC("cgroup/getsockopt")
int original_dst(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct app_addr app = {};
	struct dst *original;
	int v6;

	if (ctx->optname != SO_ORIGINAL_DST || !sk)
		return 1;
	if (ctx->level == SOL_IP && sk->family == AF_INET) {
		v6 = 0;
		mapped(&app.ip, sk->dst_ip4);
	} else if (ctx->level == SOL_IPV6 && sk->family == AF_INET6) {
		v6 = 1;
		app.ip.w[0] = sk->dst_ip6[0];
		app.ip.w[1] = sk->dst_ip6[1];
		app.ip.w[2] = sk->dst_ip6[2];
		app.ip.w[3] = sk->dst_ip6[3];
	} else {
		return 1;
	}
	if (!is_localhost(&app.ip))
		return 1;
	app.netns = bpf_get_netns_cookie(ctx);
	app.port = bpf_ntohs(sk->dst_port);
	original = bpf_map_lookup_elem(&dst_by_app, &app);
	if (!original)
		return 1;
	if (v6) {
		struct sockaddr_in6 *sa = ctx->optval;

		if ((void *)(sa + 1) > ctx->optval_end)
			return 1;
		sa->family = AF_INET6;
		sa->port = (__u16)original->port;
		sa->flowinfo = 0;
		sa->addr[0] = original->ip.w[0];
		sa->addr[1] = original->ip.w[1];
		sa->addr[2] = original->ip.w[2];
		sa->addr[3] = original->ip.w[3];
		sa->scope_id = 0;
		ctx->optlen = sizeof(*sa);
	} else {
		struct sockaddr_in4 *sa = ctx->optval;

		if ((void *)(sa + 1) > ctx->optval_end)
			return 1;
		sa->family = AF_INET;
		sa->port = (__u16)original->port;
		sa->addr = original->ip.w[3];
		__builtin_memset(sa->zero, 0, sizeof(sa->zero));
		ctx->optlen = sizeof(*sa);
	}
	/* Two 4-byte context fields: the verifier refuses the one 8-byte store clang would merge
	 * them into. */
	asm volatile("" ::: "memory");
	ctx->retval = 0;
	return 1;
}

/* A socket's two addresses, as IPv6 (ctx fields cannot be passed by pointer, hence a macro). */
#define ADDRS(ctx, local, remote)                                                                  \
	do {                                                                                       \
		if ((ctx)->family == AF_INET) {                                                    \
			mapped(&(local), (ctx)->local_ip4);                                        \
			mapped(&(remote), (ctx)->remote_ip4);                                      \
		} else {                                                                           \
			(local).w[0] = (ctx)->local_ip6[0];                                        \
			(local).w[1] = (ctx)->local_ip6[1];                                        \
			(local).w[2] = (ctx)->local_ip6[2];                                        \
			(local).w[3] = (ctx)->local_ip6[3];                                        \
			(remote).w[0] = (ctx)->remote_ip6[0];                                      \
			(remote).w[1] = (ctx)->remote_ip6[1];                                      \
			(remote).w[2] = (ctx)->remote_ip6[2];                                      \
			(remote).w[3] = (ctx)->remote_ip6[3];                                      \
		}                                                                                  \
	} while (0)

/* The app's end of an outbound connection redirected at connect(): remember its original
 * destination by the app's address, for the sidecar's end. */
static __always_inline int outbound_app_end(struct bpf_sock_ops *ops, struct pair_key *key,
					    const struct addr *local)
{
	__u64 cookie = bpf_get_socket_cookie(ops);
	struct dst *original = bpf_map_lookup_elem(&dst_by_cookie, &cookie);
	struct app_addr app = {};

	if (!original)
		return 0;
	app.netns = key->netns;
	app.ip = *local;
	app.port = ops->local_port;
	bpf_map_update_elem(&dst_by_app, &app, original, BPF_ANY);
	key->app_ip = *local;
	key->app_port = ops->local_port;
	key->proxy_port = bpf_ntohl(ops->remote_port);
	key->end = OUT_APP;
	return 1;
}

SEC("sockops")
int pair_sockets(struct bpf_sock_ops *ops)
{
	struct pair_key key = {};
	struct addr local, remote;
	struct capture *c;

	if (ops->family != AF_INET && ops->family != AF_INET6)
		return 1;
	if (ops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && ops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	key.netns = bpf_get_netns_cookie(ops);
	ADDRS(ops, local, remote);
	if (ops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		if (is_source(&local)) { /* the sidecar's end, inbound */
			key.app_ip = remote;
			key.app_port = bpf_ntohl(ops->remote_port);
			key.proxy_port = ops->local_port;
			key.end = IN_PROXY;
		} else if (!is_localhost(&remote) || !outbound_app_end(ops, &key, &local)) {
			return 1;
		}
	} else if (is_source(&remote)) { /* the app's end, inbound */
		key.app_ip = local;
		key.app_port = ops->local_port;
		key.proxy_port = bpf_ntohl(ops->remote_port);
		key.end = IN_APP;
	} else {
		/* The sidecar's end, outbound: accepted on its outbound port from loopback. */
		c = bpf_map_lookup_elem(&enrolled, &key.netns);
		if (!c || ops->local_port != c->outbound_port || !is_localhost(&remote))
			return 1;
		key.app_ip = remote;
		key.app_port = bpf_ntohl(ops->remote_port);
		key.proxy_port = ops->local_port;
		key.end = OUT_PROXY;
	}
	if (bpf_sock_hash_update(ops, &pairs, &key, BPF_ANY) == 0)
		count(PAIRED);
	return 1;
}

SEC("sk_msg")
int redirect_to_peer(struct sk_msg_md *msg)
{
	struct pair_key peer = {};
	struct addr local, remote;
	__u32 *decision;
	struct capture *c;

	if (msg->family != AF_INET && msg->family != AF_INET6)
		return SK_PASS;
	peer.netns = bpf_get_netns_cookie(msg);
	ADDRS(msg, local, remote);
	if (is_source(&local)) {
		peer.app_ip = remote;
		peer.app_port = bpf_ntohl(msg->remote_port);
		peer.proxy_port = msg->local_port;
		peer.end = IN_APP;
	} else if (is_source(&remote)) {
		peer.app_ip = local;
		peer.app_port = msg->local_port;
		peer.proxy_port = bpf_ntohl(msg->remote_port);
		peer.end = IN_PROXY;
	} else if (is_localhost(&remote) && is_localhost(&local)) {
		c = bpf_map_lookup_elem(&enrolled, &peer.netns);
		if (!c)
			return SK_PASS;
		if (bpf_ntohl(msg->remote_port) == c->outbound_port) { /* the app's end */
			peer.app_ip = local;
			peer.app_port = msg->local_port;
			peer.proxy_port = c->outbound_port;
			peer.end = OUT_PROXY;
		} else if (msg->local_port == c->outbound_port) { /* the sidecar's end */
			peer.app_ip = remote;
			peer.app_port = bpf_ntohl(msg->remote_port);
			peer.proxy_port = c->outbound_port;
			peer.end = OUT_APP;
		} else {
			return SK_PASS;
		}
	} else {
		return SK_PASS;
	}

	if (!msg->sk)
		return SK_PASS;
	decision = bpf_sk_storage_get(&decided, msg->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!decision || *decision == PASS) {
		count(PASSED);
		return SK_PASS;
	}
	if (bpf_msg_redirect_hash(msg, &pairs, &peer, BPF_F_INGRESS) == SK_PASS) {
		*decision = REDIRECT;
		count(REDIRECTED);
	} else if (*decision == UNDECIDED) {
		*decision = PASS;
		count(PASSED);
	}
	/* A redirected write goes to the peer; otherwise (no peer yet, or it has closed) over TCP. */
	return SK_PASS;
}

/* Uses no GPL-only helper. */
char LICENSE[] SEC("license") = "Apache-2.0";
