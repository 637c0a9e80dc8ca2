#include "comm/collectives.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace strata::comm::algo {
namespace {

char* Bytes(void* p) { return static_cast<char*>(p); }
const char* Bytes(const void* p) { return static_cast<const char*>(p); }

// Chunk c of N over `count` elements: [c*count/N, (c+1)*count/N). Uneven counts spread the
// remainder so no chunk differs from another by more than one element.
size_t ChunkBegin(size_t count, int n, int c) {
  return count * static_cast<size_t>(c) / static_cast<size_t>(n);
}

Status SendRecv(Transport& t, int to, const void* sbuf, size_t sbytes, int from, void* rbuf,
                size_t rbytes, int tag, const Deadline& deadline) {
  Request reqs[2];
  STRATA_ASSIGN_OR_RETURN(reqs[0], t.Irecv(from, rbuf, rbytes, tag));
  STRATA_ASSIGN_OR_RETURN(reqs[1], t.Isend(to, sbuf, sbytes, tag));
  return t.WaitAll(reqs, deadline);
}

}  // namespace

Status StarAllreduce(Transport& t, const ReduceArgs& a, int hub, size_t segment_bytes,
                     Scratch& scratch, const Deadline& deadline) {
  const int n = t.size();
  const int me = t.rank();
  const size_t es = DTypeSize(a.dtype);
  const size_t bytes = a.count * es;
  const size_t seg_elems = std::max<size_t>(1, segment_bytes / es);
  const size_t nseg = (a.count + seg_elems - 1) / seg_elems;
  auto seg_off = [&](size_t s) { return s * seg_elems * es; };
  auto seg_len = [&](size_t s) { return std::min(seg_elems, a.count - s * seg_elems) * es; };

  if (me != hub) {
    // In place: keep a copy of the input so replies can land in `out` while segments still leave.
    const char* src = Bytes(a.in);
    if (a.in == a.out) {
      scratch.bytes.Resize(bytes);
      std::memcpy(scratch.bytes.data(), a.in, bytes);
      src = Bytes(scratch.bytes.data());
    }
    std::vector<Request>& reqs = scratch.reqs;
    reqs.assign(2 * nseg, kNullRequest);
    for (size_t s = 0; s < nseg; ++s) {
      STRATA_ASSIGN_OR_RETURN(reqs[nseg + s],
                              t.Irecv(hub, Bytes(a.out) + seg_off(s), seg_len(s), kTagStarDown));
    }
    for (size_t s = 0; s < nseg; ++s) {
      STRATA_ASSIGN_OR_RETURN(reqs[s], t.Isend(hub, src + seg_off(s), seg_len(s), kTagStarUp));
    }
    return t.WaitAll(reqs, deadline);
  }

  // Hub. Every worker's buffer lands in its own scratch slot; the hub's own input is used in
  // place unless it aliases the output.
  const size_t slots = static_cast<size_t>(n) + 1;
  scratch.bytes.Resize(slots * bytes);
  auto source = [&](int r) -> const char* {
    if (r != me) return Bytes(scratch.bytes.data()) + static_cast<size_t>(r) * bytes;
    return a.in == a.out ? Bytes(scratch.bytes.data()) + static_cast<size_t>(n) * bytes : Bytes(a.in);
  };
  if (a.in == a.out) std::memcpy(Bytes(scratch.bytes.data()) + static_cast<size_t>(n) * bytes, a.in, bytes);

  // recv request of (rank r, segment s) at index s*n + r; the hub's own entries stay null.
  std::vector<Request>& recvs = scratch.reqs;
  recvs.assign(nseg * static_cast<size_t>(n), kNullRequest);
  std::vector<uint8_t>& arrived = scratch.arrived;
  arrived.assign(nseg * static_cast<size_t>(n), 0);
  for (size_t s = 0; s < nseg; ++s) {
    for (int r = 0; r < n; ++r) {
      if (r == me) {
        arrived[s * n + r] = 1;
        continue;
      }
      STRATA_ASSIGN_OR_RETURN(recvs[s * n + r],
                              t.Irecv(r, const_cast<char*>(source(r)) + seg_off(s), seg_len(s),
                                      kTagStarUp));
    }
  }
  // next[s]: the next rank to fold into segment s. Rank 0 and rank 1 are combined first
  // (Reduce2), then ranks 2..N-1 in order: a fixed association, whatever the arrival order.
  std::vector<int>& next = scratch.next;
  next.assign(nseg, 1);
  size_t next_send = 0;
  std::vector<Request>& sends = scratch.sends;
  sends.clear();
  size_t outstanding = nseg * static_cast<size_t>(n - 1);
  auto advance = [&](size_t s) -> Status {
    if (!arrived[s * n + 0]) return Status::OK();
    const size_t off = seg_off(s);
    const size_t elems = seg_len(s) / es;
    char* dst = Bytes(a.out) + off;
    while (next[s] < n && arrived[s * n + next[s]]) {
      const char* src = source(next[s]) + off;
      if (next[s] == 1) {
        kernels::Reduce2(dst, source(0) + off, src, elems, a.dtype, a.op);
      } else {
        kernels::ReduceInto(dst, src, elems, a.dtype, a.op);
      }
      ++next[s];
    }
    // Results go back strictly in segment order: receives complete out of order under MPI's
    // rendezvous protocol (a small last segment overtakes big ones), but every transport matches
    // messages from one sender in the order they were sent.
    while (next_send < nseg && next[next_send] == n) {
      for (int r = 0; r < n; ++r) {
        if (r == me) continue;
        STRATA_ASSIGN_OR_RETURN(Request req, t.Isend(r, Bytes(a.out) + seg_off(next_send),
                                                     seg_len(next_send), kTagStarDown));
        sends.push_back(req);
      }
      ++next_send;
    }
    return Status::OK();
  };
  for (size_t s = 0; s < nseg; ++s) STRATA_RETURN_IF_ERROR(advance(s));
  while (outstanding > 0) {
    STRATA_ASSIGN_OR_RETURN(size_t idx, t.WaitAny(recvs, deadline));
    arrived[idx] = 1;
    --outstanding;
    STRATA_RETURN_IF_ERROR(advance(idx / static_cast<size_t>(n)));
  }
  return t.WaitAll(sends, deadline);
}

Status RingAllreduce(Transport& t, const ReduceArgs& a, Scratch& scratch,
                     const Deadline& deadline) {
  const int n = t.size();
  const int me = t.rank();
  const size_t es = DTypeSize(a.dtype);
  if (a.in != a.out) std::memcpy(a.out, a.in, a.count * es);
  const int left = (me - 1 + n) % n;
  const int right = (me + 1) % n;
  auto begin = [&](int c) { return ChunkBegin(a.count, n, c); };
  auto len = [&](int c) { return begin(c + 1) - begin(c); };
  scratch.bytes.Resize((a.count / n + 1) * es);
  char* out = Bytes(a.out);
  // Reduce-scatter: after N-1 steps rank r holds the full reduction of chunk (r+1) mod N.
  for (int step = 0; step < n - 1; ++step) {
    const int send_c = (me - step + n) % n;
    const int recv_c = (me - step - 1 + n) % n;
    STRATA_RETURN_IF_ERROR(SendRecv(t, right, out + begin(send_c) * es, len(send_c) * es, left,
                                    scratch.bytes.data(), len(recv_c) * es, kTagRing, deadline));
    kernels::ReduceInto(out + begin(recv_c) * es, scratch.bytes.data(), len(recv_c), a.dtype, a.op);
  }
  // Allgather the reduced chunks around the same ring.
  for (int step = 0; step < n - 1; ++step) {
    const int send_c = (me + 1 - step + n) % n;
    const int recv_c = (me - step + n) % n;
    STRATA_RETURN_IF_ERROR(SendRecv(t, right, out + begin(send_c) * es, len(send_c) * es, left,
                                    out + begin(recv_c) * es, len(recv_c) * es, kTagRing,
                                    deadline));
  }
  return Status::OK();
}

Status TreeAllreduce(Transport& t, const ReduceArgs& a, Scratch& scratch,
                     const Deadline& deadline) {
  const int n = t.size();
  const int me = t.rank();
  const size_t bytes = a.count * DTypeSize(a.dtype);
  if (a.in != a.out) std::memcpy(a.out, a.in, bytes);
  scratch.bytes.Resize(bytes);
  for (int mask = 1; mask < n; mask <<= 1) {
    if (me & mask) {
      STRATA_RETURN_IF_ERROR(t.Send(me - mask, a.out, bytes, kTagTreeReduce, deadline));
      break;
    }
    if (me + mask < n) {
      STRATA_RETURN_IF_ERROR(t.Recv(me + mask, scratch.bytes.data(), bytes, kTagTreeReduce, deadline));
      kernels::ReduceInto(a.out, scratch.bytes.data(), a.count, a.dtype, a.op);
    }
  }
  return TreeBroadcast(t, a.out, bytes, 0, scratch, deadline);
}

Status StarBarrier(Transport& t, int hub, Scratch& scratch, const Deadline& deadline) {
  const int n = t.size();
  if (t.rank() != hub) {
    STRATA_RETURN_IF_ERROR(t.Send(hub, nullptr, 0, kTagBarrierUp, deadline));
    return t.Recv(hub, nullptr, 0, kTagBarrierDown, deadline);
  }
  std::vector<Request>& reqs = scratch.reqs;
  reqs.clear();
  for (int r = 0; r < n; ++r) {
    if (r == hub) continue;
    STRATA_ASSIGN_OR_RETURN(Request q, t.Irecv(r, nullptr, 0, kTagBarrierUp));
    reqs.push_back(q);
  }
  STRATA_RETURN_IF_ERROR(t.WaitAll(reqs, deadline));
  reqs.clear();
  for (int r = 0; r < n; ++r) {
    if (r == hub) continue;
    STRATA_ASSIGN_OR_RETURN(Request q, t.Isend(r, nullptr, 0, kTagBarrierDown));
    reqs.push_back(q);
  }
  return t.WaitAll(reqs, deadline);
}

Status TreeBarrier(Transport& t, Scratch& scratch, const Deadline& deadline) {
  const int n = t.size();
  const int me = t.rank();
  for (int mask = 1; mask < n; mask <<= 1) {
    if (me & mask) {
      STRATA_RETURN_IF_ERROR(t.Send(me - mask, nullptr, 0, kTagBarrierUp, deadline));
      break;
    }
    if (me + mask < n) {
      STRATA_RETURN_IF_ERROR(t.Recv(me + mask, nullptr, 0, kTagBarrierUp, deadline));
    }
  }
  return TreeBroadcast(t, nullptr, 0, 0, scratch, deadline);
}

Status StarBroadcast(Transport& t, void* buf, size_t bytes, int root, Scratch& scratch,
                     const Deadline& deadline) {
  if (t.rank() != root) return t.Recv(root, buf, bytes, kTagBroadcast, deadline);
  std::vector<Request>& reqs = scratch.reqs;
  reqs.clear();
  for (int r = 0; r < t.size(); ++r) {
    if (r == root) continue;
    STRATA_ASSIGN_OR_RETURN(Request q, t.Isend(r, buf, bytes, kTagBroadcast));
    reqs.push_back(q);
  }
  return t.WaitAll(reqs, deadline);
}

Status TreeBroadcast(Transport& t, void* buf, size_t bytes, int root, Scratch& scratch,
                     const Deadline& deadline) {
  const int n = t.size();
  const int vrank = (t.rank() - root + n) % n;  // ranks renumbered so that the root is 0
  auto real = [&](int v) { return (v + root) % n; };
  int mask = 1;
  while (mask < n) {
    if (vrank & mask) {
      STRATA_RETURN_IF_ERROR(t.Recv(real(vrank - mask), buf, bytes, kTagBroadcast, deadline));
      break;
    }
    mask <<= 1;
  }
  std::vector<Request>& reqs = scratch.reqs;
  reqs.clear();
  for (mask >>= 1; mask > 0; mask >>= 1) {
    if (vrank + mask < n) {
      STRATA_ASSIGN_OR_RETURN(Request q, t.Isend(real(vrank + mask), buf, bytes, kTagBroadcast));
      reqs.push_back(q);
    }
  }
  return t.WaitAll(reqs, deadline);
}

Status RingAllgather(Transport& t, const void* in, void* out, size_t bytes_per_rank,
                     const Deadline& deadline) {
  const int n = t.size();
  const int me = t.rank();
  char* o = Bytes(out);
  if (Bytes(in) != o + me * bytes_per_rank) std::memmove(o + me * bytes_per_rank, in, bytes_per_rank);
  const int left = (me - 1 + n) % n;
  const int right = (me + 1) % n;
  for (int step = 0; step < n - 1; ++step) {
    const int send_b = (me - step + n) % n;
    const int recv_b = (me - step - 1 + n) % n;
    STRATA_RETURN_IF_ERROR(SendRecv(t, right, o + send_b * bytes_per_rank, bytes_per_rank, left,
                                    o + recv_b * bytes_per_rank, bytes_per_rank, kTagAllgather,
                                    deadline));
  }
  return Status::OK();
}

Status StarAllgather(Transport& t, const void* in, void* out, size_t bytes_per_rank, int hub,
                     Scratch& scratch, const Deadline& deadline) {
  const int n = t.size();
  const int me = t.rank();
  char* o = Bytes(out);
  const size_t total = bytes_per_rank * static_cast<size_t>(n);
  if (me != hub) {
    STRATA_RETURN_IF_ERROR(t.Send(hub, in, bytes_per_rank, kTagAllgather, deadline));
    return t.Recv(hub, out, total, kTagBroadcast, deadline);
  }
  if (Bytes(in) != o + me * bytes_per_rank) std::memmove(o + me * bytes_per_rank, in, bytes_per_rank);
  std::vector<Request>& reqs = scratch.reqs;
  reqs.clear();
  for (int r = 0; r < n; ++r) {
    if (r == hub) continue;
    STRATA_ASSIGN_OR_RETURN(Request q, t.Irecv(r, o + r * bytes_per_rank, bytes_per_rank,
                                               kTagAllgather));
    reqs.push_back(q);
  }
  STRATA_RETURN_IF_ERROR(t.WaitAll(reqs, deadline));
  return StarBroadcast(t, out, total, hub, scratch, deadline);
}

Status RingReduceScatter(Transport& t, const ReduceArgs& a, Scratch& scratch,
                         const Deadline& deadline) {
  const int n = t.size();
  const int me = t.rank();
  const size_t es = DTypeSize(a.dtype);
  const size_t block = a.count * es;  // a.count is the per-rank count here
  // Work on a copy: blocks are accumulated in place. Layout: [N blocks | one receive block].
  scratch.bytes.Resize(block * (static_cast<size_t>(n) + 1));
  char* work = Bytes(scratch.bytes.data());
  char* incoming = work + block * static_cast<size_t>(n);
  std::memcpy(work, a.in, block * static_cast<size_t>(n));
  const int left = (me - 1 + n) % n;
  const int right = (me + 1) % n;
  // Shifted by one against the allreduce ring so that rank r ends with block r.
  for (int step = 0; step < n - 1; ++step) {
    const int send_b = (me - step - 1 + 2 * n) % n;
    const int recv_b = (me - step - 2 + 2 * n) % n;
    STRATA_RETURN_IF_ERROR(SendRecv(t, right, work + send_b * block, block, left, incoming, block,
                                    kTagRing, deadline));
    kernels::ReduceInto(work + recv_b * block, incoming, a.count, a.dtype, a.op);
  }
  std::memcpy(a.out, work + me * block, block);
  return Status::OK();
}

}  // namespace strata::comm::algo
