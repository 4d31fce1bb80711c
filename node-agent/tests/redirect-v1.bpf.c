// The first released agent's programs (IPv4 keys of 24 bytes, no connect6), frozen: the upgrade
// test attaches them as the "older version" an agent of today replaces. Not built into any binary.
//
// SPDX-License-Identifier: Apache-2.0
//
// Loopback acceleration for a sidecar's two loopback hops. Both ends of each hop sit in the
// pod's network namespace, so bytes written on one end can be queued straight onto the other
// end's receive queue (sockmap redirection), skipping the TCP/IP stack twice per write:
// segments, netfilter, the loopback device, softirq delivery and ACKs.
//
// Inbound: the sidecar delivers to its app from 127.0.0.6 (mesh.md). The capture rules return
// those connections before any NAT, so both ends see each other's addresses exactly mirrored,
// and a mirrored pair in one namespace is one connection.
//
// Outbound, in namespaces the agent has enrolled: the app's connect() to anything but loopback,
// its own addresses and the excluded ports is sent to 127.0.0.1:<outbound port> here, where the
// sidecar listens — not NATed by the capture rules, so the ends mirror each other again — and
// the original destination is kept for the sidecar's SO_ORIGINAL_DST and the app's getpeername().
// Connections the capture rules NAT are never paired: their ends disagree about the addresses.
//
// An app on a dual-stack IPv6 socket sees the sidecar as ::ffff:127.0.0.6; the kernel keeps the
// IPv4 addresses of such a socket beside the mapped ones, so the same tests apply (an IPv6-only
// connection has no IPv4 addresses and never matches).

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOL_IP 0
#define SO_ORIGINAL_DST 80
#define LOCALHOST 0x7f000001      /* 127.0.0.1 */
#define INBOUND_SOURCE 0x7f000006 /* 127.0.0.6 */
#define MAX_ADDRS 4
#define MAX_EXCLUDED 16

/* Which end of which hop a socket is. */
enum end { IN_PROXY = 0, IN_APP = 1, OUT_PROXY = 2, OUT_APP = 3 };
enum decision { UNDECIDED = 0, REDIRECT = 1, PASS = 2 };
enum count { REDIRECTED = 0, PASSED = 1, PAIRED = 2, CONNECTS = 3, COUNTS = 4 };

/* One end of a sidecar ↔ app connection, named from the app's side. */
struct pair_key {
	__u64 netns;
	__u32 app_ip;     /* network byte order */
	__u32 app_port;   /* host byte order */
	__u32 proxy_port; /* host byte order */
	__u32 end;
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
	__u32 excluded[MAX_EXCLUDED];     /* destination ports never captured, host order; 0 = none */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64); /* network namespace cookie */
	__type(value, struct capture);
} enrolled SEC(".maps");

struct dst {
	__u32 ip;   /* network byte order */
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
	__u32 ip;   /* network byte order */
	__u32 port; /* host byte order */
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

/* Whether the capture rules would send a connect to ip:port (host order port) to the sidecar. */
static __always_inline int captured(struct capture *c, __u32 ip, __u32 port)
{
	if ((bpf_ntohl(ip) >> 24) == 127)
		return 0;
#pragma unroll
	for (int i = 0; i < MAX_ADDRS; i++)
		if (c->addrs[i] == ip)
			return 0;
#pragma unroll
	for (int i = 0; i < MAX_EXCLUDED; i++)
		if (c->excluded[i] == port)
			return 0;
	return 1;
}

SEC("cgroup/connect4")
int redirect_outbound(struct bpf_sock_addr *ctx)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct capture *c = bpf_map_lookup_elem(&enrolled, &netns);
	__u64 ids, cookie;
	struct dst original;

	if (!c || ctx->type != SOCK_STREAM)
		return 1;
	ids = bpf_get_current_uid_gid();
	if ((__u32)ids == c->proxy_uid || (__u32)(ids >> 32) == c->proxy_gid)
		return 1;
	if (!captured(c, ctx->user_ip4, bpf_ntohs((__u16)ctx->user_port)))
		return 1;
	original.ip = ctx->user_ip4;
	original.port = ctx->user_port;
	cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&dst_by_cookie, &cookie, &original, BPF_ANY))
		return 1; /* not redirected: the capture rules take it */
	ctx->user_ip4 = bpf_htonl(LOCALHOST);
	ctx->user_port = bpf_htons((__u16)c->outbound_port);
	count(CONNECTS);
	return 1;
}

/* The app asking whom it is connected to gets the address it dialled. */
SEC("cgroup/getpeername4")
int original_peer(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct dst *original = bpf_map_lookup_elem(&dst_by_cookie, &cookie);

	if (original) {
		ctx->user_ip4 = original->ip;
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

/* The sidecar's SO_ORIGINAL_DST on a connection redirected at connect(): no NAT happened, so
 * conntrack has nothing to say; the address the app dialled is the answer. */
SEC("cgroup/getsockopt")
int original_dst(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct sockaddr_in4 *sa = ctx->optval;
	struct app_addr app = {};
	struct dst *original;

	if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST || !sk)
		return 1;
	if (sk->family != AF_INET || sk->dst_ip4 != bpf_htonl(LOCALHOST))
		return 1;
	app.netns = bpf_get_netns_cookie(ctx);
	app.ip = sk->dst_ip4;
	app.port = bpf_ntohs(sk->dst_port);
	original = bpf_map_lookup_elem(&dst_by_app, &app);
	if (!original || (void *)(sa + 1) > ctx->optval_end)
		return 1;
	sa->family = AF_INET;
	sa->port = (__u16)original->port;
	sa->addr = original->ip;
	__builtin_memset(sa->zero, 0, sizeof(sa->zero));
	ctx->optlen = sizeof(*sa);
	/* Two 4-byte context fields: the verifier refuses the one 8-byte store clang would merge
	 * them into. */
	asm volatile("" ::: "memory");
	ctx->retval = 0;
	return 1;
}

/* The app's end of an outbound connection redirected at connect(): remember its original
 * destination by the app's address, for the sidecar's end. */
static __always_inline int outbound_app_end(struct bpf_sock_ops *ops, struct pair_key *key)
{
	__u64 cookie = bpf_get_socket_cookie(ops);
	struct dst *original = bpf_map_lookup_elem(&dst_by_cookie, &cookie);
	struct app_addr app = {};

	if (!original)
		return 0;
	app.netns = key->netns;
	app.ip = ops->local_ip4;
	app.port = ops->local_port;
	bpf_map_update_elem(&dst_by_app, &app, original, BPF_ANY);
	key->app_ip = ops->local_ip4;
	key->app_port = ops->local_port;
	key->proxy_port = bpf_ntohl(ops->remote_port);
	key->end = OUT_APP;
	return 1;
}

SEC("sockops")
int pair_sockets(struct bpf_sock_ops *ops)
{
	struct pair_key key = {};
	__u32 source = bpf_htonl(INBOUND_SOURCE), localhost = bpf_htonl(LOCALHOST);
	struct capture *c;

	if (ops->family != AF_INET && ops->family != AF_INET6)
		return 1;
	key.netns = bpf_get_netns_cookie(ops);
	switch (ops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (ops->local_ip4 == source) { /* the sidecar's end, inbound */
			key.app_ip = ops->remote_ip4;
			key.app_port = bpf_ntohl(ops->remote_port);
			key.proxy_port = ops->local_port;
			key.end = IN_PROXY;
		} else if (ops->remote_ip4 != localhost || !outbound_app_end(ops, &key)) {
			return 1;
		}
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (ops->remote_ip4 == source) { /* the app's end, inbound */
			key.app_ip = ops->local_ip4;
			key.app_port = ops->local_port;
			key.proxy_port = bpf_ntohl(ops->remote_port);
			key.end = IN_APP;
			break;
		}
		/* The sidecar's end, outbound: accepted on its outbound port from loopback. */
		c = bpf_map_lookup_elem(&enrolled, &key.netns);
		if (!c || ops->local_port != c->outbound_port || ops->remote_ip4 != localhost)
			return 1;
		key.app_ip = ops->remote_ip4;
		key.app_port = bpf_ntohl(ops->remote_port);
		key.proxy_port = ops->local_port;
		key.end = OUT_PROXY;
		break;
	default:
		return 1;
	}
	if (bpf_sock_hash_update(ops, &pairs, &key, BPF_ANY) == 0)
		count(PAIRED);
	return 1;
}

SEC("sk_msg")
int redirect_to_peer(struct sk_msg_md *msg)
{
	struct pair_key peer = {};
	__u32 source = bpf_htonl(INBOUND_SOURCE), localhost = bpf_htonl(LOCALHOST);
	__u32 *decision;
	struct capture *c;

	if (msg->family != AF_INET && msg->family != AF_INET6)
		return SK_PASS;
	peer.netns = bpf_get_netns_cookie(msg);
	if (msg->local_ip4 == source) {
		peer.app_ip = msg->remote_ip4;
		peer.app_port = bpf_ntohl(msg->remote_port);
		peer.proxy_port = msg->local_port;
		peer.end = IN_APP;
	} else if (msg->remote_ip4 == source) {
		peer.app_ip = msg->local_ip4;
		peer.app_port = msg->local_port;
		peer.proxy_port = bpf_ntohl(msg->remote_port);
		peer.end = IN_PROXY;
	} else if (msg->remote_ip4 == localhost && msg->local_ip4 == localhost) {
		c = bpf_map_lookup_elem(&enrolled, &peer.netns);
		if (!c)
			return SK_PASS;
		if (bpf_ntohl(msg->remote_port) == c->outbound_port) { /* the app's end */
			peer.app_ip = msg->local_ip4;
			peer.app_port = msg->local_port;
			peer.proxy_port = c->outbound_port;
			peer.end = OUT_PROXY;
		} else if (msg->local_port == c->outbound_port) { /* the sidecar's end */
			peer.app_ip = msg->remote_ip4;
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
