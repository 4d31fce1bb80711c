// SPDX-License-Identifier: Apache-2.0
//
// Loopback acceleration for the sidecar's inbound hop: the sidecar delivers inbound traffic to
// its application from 127.0.0.6 (mesh.md), over TCP on the pod's loopback. Both ends of such a
// connection sit in one network namespace, so bytes written on one end can be queued straight
// onto the other end's receive queue (sockmap redirection), skipping the TCP/IP stack twice per
// write: segments, netfilter, the loopback device, softirq delivery and ACKs.
//
// Only connections from 127.0.0.6 are paired: the capture rules return them before any NAT
// (mesh.md), so the two ends see each other's addresses exactly mirrored, and a mirrored pair
// in one namespace is one connection. Connections that pass through NAT (the app's outbound
// calls, redirected to 15001) are never paired: their ends disagree about the addresses.
// An app listening on a dual-stack IPv6 socket sees the sidecar as ::ffff:127.0.0.6; the kernel
// keeps the IPv4 addresses of such a socket beside the mapped ones, so the same test applies
// (an IPv6-only connection has no IPv4 addresses and never matches).

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define INBOUND_SOURCE 0x7f000006 /* 127.0.0.6 */

enum end { PROXY_END = 0, APP_END = 1 };
enum decision { UNDECIDED = 0, REDIRECT = 1, PASS = 2 };
enum count { REDIRECTED = 0, PASSED = 1, PAIRED = 2, COUNTS = 3 };

/* One end of a sidecar → app connection, named from the app's side. */
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

static __always_inline void count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&counts, &which);
	if (n)
		*n += 1;
}

SEC("sockops")
int pair_sockets(struct bpf_sock_ops *ops)
{
	struct pair_key key = {};
	__u32 source = bpf_htonl(INBOUND_SOURCE);

	if (ops->family != AF_INET && ops->family != AF_INET6)
		return 1;
	switch (ops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: /* the sidecar's end */
		if (ops->local_ip4 != source)
			return 1;
		key.app_ip = ops->remote_ip4;
		key.app_port = bpf_ntohl(ops->remote_port);
		key.proxy_port = ops->local_port;
		key.end = PROXY_END;
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: /* the application's end */
		if (ops->remote_ip4 != source)
			return 1;
		key.app_ip = ops->local_ip4;
		key.app_port = ops->local_port;
		key.proxy_port = bpf_ntohl(ops->remote_port);
		key.end = APP_END;
		break;
	default:
		return 1;
	}
	key.netns = bpf_get_netns_cookie(ops);
	if (bpf_sock_hash_update(ops, &pairs, &key, BPF_ANY) == 0)
		count(PAIRED);
	return 1;
}

SEC("sk_msg")
int redirect_to_peer(struct sk_msg_md *msg)
{
	struct pair_key peer = {};
	__u32 source = bpf_htonl(INBOUND_SOURCE);
	__u32 *decision;

	if (msg->family != AF_INET && msg->family != AF_INET6)
		return SK_PASS;
	if (msg->local_ip4 == source) {
		peer.app_ip = msg->remote_ip4;
		peer.app_port = bpf_ntohl(msg->remote_port);
		peer.proxy_port = msg->local_port;
		peer.end = APP_END;
	} else if (msg->remote_ip4 == source) {
		peer.app_ip = msg->local_ip4;
		peer.app_port = msg->local_port;
		peer.proxy_port = bpf_ntohl(msg->remote_port);
		peer.end = PROXY_END;
	} else {
		return SK_PASS;
	}
	peer.netns = bpf_get_netns_cookie(msg);

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
