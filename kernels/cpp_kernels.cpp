// CPU kernels for the memory lookup's backwards and the sparse optimizer update.
//
// Built on first use by memdist/kernels/cpp_ops.py through torch's cpp_extension, with
// -ffp-contract=off so that no multiply-add is fused: every output element is computed by
// one thread in a fixed order, so results do not depend on the thread count, the CPU's
// instruction set or how the work is split (a row-wise shard gets only its own entries
// of each bag, in bags of any length: the same sums in the same order).
//
// Letters: N bags, K rows per bag, V table rows, D row width, U unique rows, M = N*K.
// Tensors arrive checked (memdist.kernels): fp32 contiguous data, int64 indices.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;

// <a, b> over d elements: 16 independent partial sums (the compiler vectorises them
// without reassociating), folded in a fixed tree, then the tail in order.
inline float dot(const float* a, const float* b, int64_t d) {
  float acc[kLanes] = {0.f};
  const int64_t body = d - d % kLanes;
  for (int64_t i = 0; i < body; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  float out = acc[0];
  for (int64_t i = body; i < d; ++i) out += a[i] * b[i];
  return out;
}

// Asks for the row at p (d floats) ahead of its use: rows of a large table are read in an
// order no hardware prefetcher guesses, so each would otherwise wait on memory in turn.
// Into L2 (prefetcht1), not L1: on a 2-core AMD EPYC, random 512-byte rows of a 512 MiB
// table were gathered 1.6x faster so (2.2-2.4 ms against 3.8-3.9 for 131072 rows, 8 ahead
// into L1, about torch's F.embedding_bag's figure), likely because a core tracks only a
// handful of L1 misses at once (a row is 8 lines) and a request into L2 holds none.
inline void prefetch_row(const float* p, int64_t d) {
  for (int64_t i = 0; i < d; i += 16) __builtin_prefetch(p + i, 0, 2);
}

constexpr int64_t kAhead = 16;  // rows requested ahead
// Entries ahead whose output-gradient row (and score-gradient slot) the backwards
// request: they visit entries in row order, so each reads a dy row of some other bag,
// mostly from another core's cache on 2 threads (2048 x 64 into 65536 x 128 on 2
// threads: 4.64-4.84 -> 3.09-3.46 ms; on 1 thread within noise).
constexpr int64_t kDyAhead = 4;

constexpr int64_t kHugePage = int64_t{2} << 20;

// Asks Linux to back [p, p + bytes) with 2 MiB pages where the kernel's transparent huge
// pages are on "madvise" (a no-op where they are "always" or "never"): rows of a large
// table read in random order then miss the TLB far less, and a fresh buffer faults once
// per 2 MiB instead of per 4 KiB. Only whole huge pages inside the range are advised.
void advise_range(void* p, int64_t bytes) {
#ifdef __linux__
  const auto start = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (start + kHugePage - 1) & ~static_cast<uintptr_t>(kHugePage - 1);
  const uintptr_t hi = (start + bytes) & ~static_cast<uintptr_t>(kHugePage - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only
#endif
}

// Memory for the row gradients, kept when torch frees it and given to the next call.
// A fresh buffer of a step's gradient (63 MB for the 123K rows a 1M-row table's step
// touches) is faulted in and zeroed by Linux page by page on first write: 7.4 ms to
// fill one against 1.8 ms for the same buffer again. Steps touch about as many rows
// each time, so the smallest kept buffer of at least the size asked for (and at most a
// quarter and 2 MiB more; the latest freed among equals) is taken; at most kKeep are kept.
class BufferPool {
 public:
  torch::Tensor empty(int64_t rows, int64_t cols) {
    if (rows * cols == 0) return torch::empty({rows, cols}, torch::kFloat32);
    const size_t want = static_cast<size_t>(rows * cols) * sizeof(float);
    void* p = nullptr;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {
        const size_t have = free_[i].second;
        if (have >= want && have <= want + want / 4 + kHuge &&
            (best == free_.size() || have <= free_[best].second)) {  // ties: the latest
          best = i;
        }
      }
      if (best < free_.size()) {
        p = free_[best].first;
        bytes = free_[best].second;
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
      }
    }
    if (p == nullptr) {
      bytes = (want + kHuge - 1) / kHuge * kHuge;
      p = std::aligned_alloc(kHuge, bytes);
      if (p == nullptr) throw std::bad_alloc();
      advise(p, bytes);
    }
    return torch::from_blob(
        p, {rows, cols}, [this, bytes](void* q) { give(q, bytes); },
        torch::TensorOptions().dtype(torch::kFloat32));
  }

 private:
  static constexpr size_t kHuge = size_t{2} << 20;
  static constexpr size_t kKeep = 4;

  static void advise(void* p, size_t bytes) {
#ifdef __linux__
    madvise(p, bytes, MADV_HUGEPAGE);  // advice only
#endif
  }

  void give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.emplace_back(p, bytes);
    if (free_.size() > kKeep) {  // the oldest goes back to the system
      std::free(free_.front().first);
      free_.erase(free_.begin());
    }
  }

  std::mutex mu_;
  std::vector<std::pair<void*, size_t>> free_;
};

// Never destroyed: tensors freed while the process exits still give their memory back.
BufferPool& gradient_pool() {
  static BufferPool* pool = new BufferPool();
  return *pool;
}

// Grain sizes: a task of at least ~32K multiply-adds, so small calls stay on one thread.
inline int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

// scores[c] = sum_i q[i] * keysT[i * C + c], each summed over i in order, 16 keys at a
// time. Cloned for AVX2: the lanes are independent and nothing is contracted, so both
// clones compute the same bits.
__attribute__((target_clones("avx2", "default"))) void score_keys(
    const float* q, const float* keysT, int64_t qd, int64_t c_count, float* scores) {
  const int64_t body = c_count - c_count % kLanes;
  for (int64_t c0 = 0; c0 < body; c0 += kLanes) {
    float acc[kLanes] = {0.f};
    for (int64_t i = 0; i < qd; ++i) {
      const float qi = q[i];
      const float* row = keysT + i * c_count + c0;
      for (int64_t j = 0; j < kLanes; ++j) acc[j] += qi * row[j];
    }
    for (int64_t j = 0; j < kLanes; ++j) scores[c0 + j] = acc[j];
  }
  for (int64_t c = body; c < c_count; ++c) {
    float acc = 0.f;
    for (int64_t i = 0; i < qd; ++i) acc += q[i] * keysT[i * c_count + c];
    scores[c] = acc;
  }
}

// Scores as unsigned keys in the same order (NaN lowest, then -inf ... +inf; -0 < +0), so
// ranking is integer comparison: higher key first, equal keys lower index first.
// Without branches, so a loop of them vectorises.
inline uint32_t order_key(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t negative = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31);
  const uint32_t key = bits ^ (negative | 0x80000000u);  // ~bits if negative, else sign set
  return x != x ? 0u : key;                               // NaN lowest
}

// order_key over n scores (cloned for AVX2).
__attribute__((target_clones("avx2", "default"))) void order_keys(const float* x, uint32_t* out,
                                                                   int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = order_key(x[i]);
}

inline bool ranks_before(const uint32_t* key, int64_t a, int64_t b) {
  return key[a] > key[b] || (key[a] == key[b] && a < b);
}

// Sorts idx[0, k) into rank order (k is small).
inline void sort_by_rank(const uint32_t* key, int64_t* idx, int64_t k) {
  for (int64_t j = 1; j < k; ++j) {
    const int64_t c = idx[j];
    int64_t pos = j;
    while (pos > 0 && ranks_before(key, c, idx[pos - 1])) {
      idx[pos] = idx[pos - 1];
      --pos;
    }
    idx[pos] = c;
  }
}

// The knn best of key[0, C) into idx (two ways to the same result). Few keys per pick:
// find the knn-th largest key bit by bit (each bit one vectorised counting pass), take
// the keys above it and the first of those equal to it, sort those. Bits every key
// shares are the threshold's too and cost no pass; the search stops early at a
// threshold exactly knn keys reach (then those are the knn best, whatever the lower
// bits). Many keys per pick: a sorted buffer that a key must beat to enter (rarely,
// once the buffer is good).
__attribute__((target_clones("avx2", "default"))) uint32_t kth_key(const uint32_t* key,
                                                                    int32_t c_count,
                                                                    int32_t knn) {
  uint32_t all_and = ~0u, all_or = 0u;
  for (int32_t c = 0; c < c_count; ++c) {
    all_and &= key[c];
    all_or |= key[c];
  }
  const uint32_t differ = all_and ^ all_or;
  if (differ == 0u) return all_and;  // every key equal
  const int top = 31 - __builtin_clz(differ);  // the highest bit where keys differ
  uint32_t kth = all_and & ~((2u << top) - 1u);  // the shared bits above it
  for (int bit = top; bit >= 0; --bit) {
    const uint32_t cand = kth | (1u << bit);
    int32_t count = 0;
    for (int32_t c = 0; c < c_count; ++c) count += key[c] >= cand ? 1 : 0;
    if (count >= knn) {
      kth = cand;
      if (count == knn) break;
    }
  }
  return kth;
}

// The knn keys' rank order without branches: each one's place is how many of the others
// rank before it (keys packed above their complemented index, so every pair differs and
// a greater packed value ranks first). O(knn^2) compares that vectorise; knn <= 64 here.
__attribute__((target_clones("avx2", "default"))) void rank_in_place(const uint32_t* key,
                                                                      int64_t* idx,
                                                                      int64_t knn) {
  int64_t packed[64], place[64];
  for (int64_t j = 0; j < knn; ++j) {
    const uint64_t p = (static_cast<uint64_t>(key[idx[j]]) << 32) | (~static_cast<uint32_t>(idx[j]));
    packed[j] = static_cast<int64_t>(p ^ (uint64_t{1} << 63));  // signed order = unsigned order
  }
  for (int64_t j = 0; j < knn; ++j) {
    int64_t before = 0;
    for (int64_t i = 0; i < knn; ++i) before += packed[i] > packed[j] ? 1 : 0;
    place[j] = before;
  }
  int64_t sorted[64];
  for (int64_t j = 0; j < knn; ++j) sorted[place[j]] = idx[j];
  std::memcpy(idx, sorted, sizeof(int64_t) * knn);
}

// scratch holds c_count + 1 indices.
void select_by_radix(const uint32_t* key, int64_t c_count, int64_t knn, int64_t* idx,
                     int64_t* scratch) {
  const uint32_t kth = kth_key(key, static_cast<int32_t>(c_count), static_cast<int32_t>(knn));
  int64_t out = 0;
  for (int64_t c = 0; c < c_count; ++c) {  // at most knn keys lie above kth
    scratch[out] = c;
    out += key[c] > kth ? 1 : 0;
  }
  std::memcpy(idx, scratch, sizeof(int64_t) * out);
  for (int64_t c = 0; c < c_count && out < knn; ++c) {
    if (key[c] == kth) idx[out++] = c;
  }
  if (knn <= 64) {
    rank_in_place(key, idx, knn);
  } else {
    sort_by_rank(key, idx, knn);
  }
}

// Keys are checked kLanes at a time against the buffer's last key (one vectorised "any
// greater" test); only a block with a key that would enter goes through them in order.
__attribute__((target_clones("avx2", "default"))) void select_by_insertion(const uint32_t* key,
                                                                            int64_t c_count,
                                                                            int64_t knn,
                                                                            int64_t* idx) {
  for (int64_t c = 0; c < knn; ++c) idx[c] = c;
  sort_by_rank(key, idx, knn);
  int64_t c = knn;
  while (c < c_count) {
    const uint32_t last = key[idx[knn - 1]];
    if (c + kLanes <= c_count) {
      uint32_t enters = 0;
      for (int64_t j = 0; j < kLanes; ++j) enters |= key[c + j] > last ? 1u : 0u;
      if (enters == 0) {
        c += kLanes;
        continue;
      }
    }
    const int64_t stop = std::min(c + kLanes, c_count);
    for (; c < stop; ++c) {
      // c runs up, so an equal key never displaces an earlier one.
      if (key[c] <= key[idx[knn - 1]]) continue;
      int64_t pos = knn - 1;
      while (pos > 0 && key[c] > key[idx[pos - 1]]) {
        idx[pos] = idx[pos - 1];
        --pos;
      }
      idx[pos] = c;
    }
  }
}

// The knn best of key[0, C) into idx, best first; scratch holds C + 1 indices.
void select_best(const uint32_t* key, int64_t c_count, int64_t knn, int64_t* idx,
                 int64_t* scratch) {
  if (c_count <= 32 * knn && c_count < (int64_t{1} << 31)) {
    select_by_radix(key, c_count, knn, idx, scratch);
  } else {
    select_by_insertion(key, c_count, knn, idx);
  }
}

}  // namespace

// Bags [begin, end) of bag_forward: bag i is entries [first(i), first(i + 1)), where
// first(i) is offsets[i], or i * k without offsets. Cloned for AVX2: the columns are
// independent and nothing is contracted, so both clones compute the same bits.
__attribute__((target_clones("avx2", "default"))) void forward_bags(
    int64_t begin, int64_t end, int64_t k, const int64_t* offsets, int64_t d,
    const float* values, const int64_t* idx, const float* scores, float* out) {
  constexpr int64_t w = 32;  // columns summed in registers at a time
  const int64_t body = d - d % w;
  for (int64_t i = begin; i < end; ++i) {
    float* y = out + i * d;
    const int64_t first = offsets ? offsets[i] : i * k;
    const int64_t count = (offsets ? offsets[i + 1] : first + k) - first;
    const int64_t* ix = idx + first;
    const float* sc = scores + first;
    // The next bag's entries, asked for while this bag is summed.
    const int64_t* nx = ix + count;
    const int64_t ahead = i + 1 < end ? (offsets ? offsets[i + 2] - offsets[i + 1] : k) : 0;
    for (int64_t c0 = 0; c0 < body; c0 += w) {
      float acc[w] = {0.f};
      for (int64_t j = 0; j < count; ++j) {
        if (c0 == 0 && j < ahead) prefetch_row(values + nx[j] * d, d);
        const float s = sc[j];
        const float* row = values + ix[j] * d + c0;
        for (int64_t c = 0; c < w; ++c) acc[c] += s * row[c];
      }
      for (int64_t c = 0; c < w; ++c) y[c0 + c] = acc[c];
    }
    // Rows narrower than one block, or a next bag longer than this one: ask for the rest.
    for (int64_t j = body == 0 ? 0 : count; j < ahead; ++j) prefetch_row(values + nx[j] * d, d);
    for (int64_t c = body; c < d; ++c) {
      float acc = 0.f;
      for (int64_t j = 0; j < count; ++j) acc += sc[j] * values[ix[j] * d + c];
      y[c] = acc;
    }
  }
}

// y_ND[n] = sum over k, in order from zero, of scores_NK[n, k] * values_VD[idx_NK[n, k]].
// With offsets_N1 (bags of any length): idx and scores are 1-D and bag n sums entries
// [offsets_N1[n], offsets_N1[n + 1]) in order.
torch::Tensor bag_forward(torch::Tensor values_VD, torch::Tensor idx_NK, torch::Tensor scores_NK,
                          std::optional<torch::Tensor> offsets_N1) {
  const int64_t* offsets = offsets_N1 ? offsets_N1->data_ptr<int64_t>() : nullptr;
  const int64_t n = offsets ? offsets_N1->size(0) - 1 : idx_NK.size(0);
  const int64_t k = offsets ? 0 : idx_NK.size(1), d = values_VD.size(1);
  const int64_t per_bag = offsets ? idx_NK.numel() / std::max<int64_t>(1, n) : k;
  auto out_ND = torch::empty({n, d}, values_VD.options());
  const float* values = values_VD.data_ptr<float>();
  const int64_t* idx = idx_NK.data_ptr<int64_t>();
  const float* scores = scores_NK.data_ptr<float>();
  float* out = out_ND.data_ptr<float>();
  at::parallel_for(0, n, grain(std::max<int64_t>(1, per_bag) * d), [&](int64_t begin, int64_t end) {
    forward_bags(begin, end, k, offsets, d, values, idx, scores, out);
  });
  return out_ND;
}

// Bags [begin, end) of bag_backward_scores. Cloned for AVX2: dot's 16 lanes are explicit
// and nothing is contracted, so both clones compute the same bits.
__attribute__((target_clones("avx2", "default"))) void scores_bags(
    int64_t begin, int64_t end, int64_t k, int64_t d, const float* values, const float* dy,
    const int64_t* idx, float* out) {
  for (int64_t i = begin; i < end; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t ahead = i * k + j + kAhead;
      if (ahead < end * k) prefetch_row(values + idx[ahead] * d, d);
      out[i * k + j] = dot(dy + i * d, values + idx[i * k + j] * d, d);
    }
  }
}

// dscores_NK[n, k] = <dy_ND[n], values_VD[idx_NK[n, k]]>
torch::Tensor bag_backward_scores(torch::Tensor values_VD, torch::Tensor idx_NK,
                                  torch::Tensor dy_ND) {
  const int64_t n = idx_NK.size(0), k = idx_NK.size(1), d = values_VD.size(1);
  auto out_NK = torch::empty({n, k}, dy_ND.options());
  const float* values = values_VD.data_ptr<float>();
  const float* dy = dy_ND.data_ptr<float>();
  const int64_t* idx = idx_NK.data_ptr<int64_t>();
  float* out = out_NK.data_ptr<float>();
  at::parallel_for(0, n, grain(k * d), [&](int64_t begin, int64_t end) {
    scores_bags(begin, end, k, d, values, dy, idx, out);
  });
  return out_NK;
}

// The reverse index of flat indices idx_M (values in [0, num_rows)): sorted unique rows_U,
// offsets_U1 and order_M such that the positions of rows_U[u] are
// order_M[offsets_U1[u] : offsets_U1[u + 1]] in increasing order (a stable sort's).
// A counting sort over the rows when they are few against the positions; else a
// least-significant-digit radix sort of the positions (stable, O(positions) a pass),
// whose cost does not grow with the table.
std::vector<torch::Tensor> reverse_index(torch::Tensor idx_M, int64_t num_rows) {
  const int64_t m_count = idx_M.size(0);
  const int64_t* idx = idx_M.data_ptr<int64_t>();
  auto opts = idx_M.options();
  auto order_M = torch::empty({m_count}, opts);
  int64_t* order = order_M.data_ptr<int64_t>();
  if (num_rows <= 4 * m_count + 4096) {
    std::vector<int64_t> start(num_rows + 1, 0);
    for (int64_t m = 0; m < m_count; ++m) ++start[idx[m] + 1];
    int64_t u_count = 0;
    for (int64_t v = 0; v < num_rows; ++v) u_count += start[v + 1] > 0;
    auto rows_U = torch::empty({u_count}, opts);
    auto offsets_U1 = torch::empty({u_count + 1}, opts);
    int64_t* rows = rows_U.data_ptr<int64_t>();
    int64_t* offsets = offsets_U1.data_ptr<int64_t>();
    int64_t u = 0;
    offsets[0] = 0;
    for (int64_t v = 0; v < num_rows; ++v) {
      const int64_t count = start[v + 1];
      start[v + 1] = start[v] + count;
      if (count > 0) {
        rows[u] = v;
        offsets[++u] = start[v + 1];
      }
    }
    for (int64_t m = 0; m < m_count; ++m) order[start[idx[m]]++] = m;
    return {rows_U, offsets_U1, order_M};
  }
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) < num_rows) ++bits;
  const int passes = (bits + 10) / 11;  // digits of at most 11 bits
  const int digit = (bits + passes - 1) / passes;
  const int64_t buckets = int64_t{1} << digit;
  std::vector<int64_t> keys(idx, idx + m_count), keys2(m_count), pos(m_count), pos2(m_count);
  for (int64_t m = 0; m < m_count; ++m) pos[m] = m;
  std::vector<int64_t> count(buckets + 1);
  for (int p = 0; p < passes; ++p) {
    const int shift = p * digit;
    std::fill(count.begin(), count.end(), 0);
    for (int64_t m = 0; m < m_count; ++m) ++count[((keys[m] >> shift) & (buckets - 1)) + 1];
    for (int64_t b = 0; b < buckets; ++b) count[b + 1] += count[b];
    int64_t* out_pos = p + 1 == passes ? order : pos2.data();
    for (int64_t m = 0; m < m_count; ++m) {
      const int64_t at = count[(keys[m] >> shift) & (buckets - 1)]++;
      keys2[at] = keys[m];
      out_pos[at] = pos[m];
    }
    keys.swap(keys2);
    pos.swap(pos2);
  }
  int64_t u_count = 0;
  for (int64_t m = 0; m < m_count; ++m) u_count += m == 0 || keys[m] != keys[m - 1];
  auto rows_U = torch::empty({u_count}, opts);
  auto offsets_U1 = torch::empty({u_count + 1}, opts);
  int64_t* rows = rows_U.data_ptr<int64_t>();
  int64_t* offsets = offsets_U1.data_ptr<int64_t>();
  int64_t u = 0;
  for (int64_t m = 0; m < m_count; ++m) {
    if (m == 0 || keys[m] != keys[m - 1]) {
      rows[u] = keys[m];
      offsets[u++] = m;
    }
  }
  offsets[u_count] = m_count;
  return {rows_U, offsets_U1, order_M};
}

// Rows [begin, end) of bag_backward_values (cloned for AVX2: the columns are independent
// and nothing is contracted, so both clones compute the same bits).
__attribute__((target_clones("avx2", "default"))) void values_rows(
    int64_t begin, int64_t end, int64_t d, int64_t k, const int64_t* order,
    const int64_t* offsets, const float* scores, const float* dy, float* grad) {
  const int64_t stop = offsets[end];
  for (int64_t u = begin; u < end; ++u) {
    float* g = grad + u * d;
    for (int64_t c = 0; c < d; ++c) g[c] = 0.f;
    for (int64_t p = offsets[u]; p < offsets[u + 1]; ++p) {
      if (p + kDyAhead < stop) prefetch_row(dy + (order[p + kDyAhead] / k) * d, d);
      const int64_t m = order[p];
      const float s = scores[m];
      const float* row = dy + (m / k) * d;
      for (int64_t c = 0; c < d; ++c) g[c] += s * row[c];
    }
  }
}

// grad_UD[u] = sum over m in order_M[offsets_U1[u] : offsets_U1[u + 1]] of
// scores_M[m] * dy_ND[m / K], added in that (flat position) order starting from zero:
// the sums index_add_ makes with the products s * dy, without materialising them.
torch::Tensor bag_backward_values(torch::Tensor order_M, torch::Tensor offsets_U1,
                                  torch::Tensor scores_M, torch::Tensor dy_ND, int64_t k) {
  const int64_t u_count = offsets_U1.size(0) - 1, d = dy_ND.size(1);
  const int64_t m_count = order_M.size(0);
  auto grad_UD = gradient_pool().empty(u_count, d);
  const int64_t* order = order_M.data_ptr<int64_t>();
  const int64_t* offsets = offsets_U1.data_ptr<int64_t>();
  const float* scores = scores_M.data_ptr<float>();
  const float* dy = dy_ND.data_ptr<float>();
  float* grad = grad_UD.data_ptr<float>();
  const int64_t per_row = std::max<int64_t>(1, m_count / std::max<int64_t>(1, u_count));
  at::parallel_for(0, u_count, grain(per_row * d), [&](int64_t begin, int64_t end) {
    values_rows(begin, end, d, k, order, offsets, scores, dy, grad);
  });
  return grad_UD;
}

// Rows [begin, end) of bag_backward (cloned for AVX2 like values_rows and scores_bags).
__attribute__((target_clones("avx2", "default"))) void bag_rows(
    int64_t begin, int64_t end, int64_t d, int64_t k, const int64_t* bag_of, const int64_t* rows,
    const int64_t* order, const int64_t* offsets, const float* values, const float* scores,
    const float* dy, float* grad, float* dscores) {
  const int64_t stop = offsets[end];
  for (int64_t u = begin; u < end; ++u) {
    if (u + kAhead < end) prefetch_row(values + rows[u + kAhead] * d, d);
    const float* v = values + rows[u] * d;
    float* g = grad + u * d;
    for (int64_t c = 0; c < d; ++c) g[c] = 0.f;
    for (int64_t p = offsets[u]; p < offsets[u + 1]; ++p) {
      if (p + kDyAhead < stop) {
        const int64_t ahead = order[p + kDyAhead];
        prefetch_row(dy + (bag_of ? bag_of[ahead] : ahead / k) * d, d);
        __builtin_prefetch(dscores + ahead, 1, 2);
      }
      const int64_t m = order[p];
      const float* row = dy + (bag_of ? bag_of[m] : m / k) * d;
      dscores[m] = dot(row, v, d);
      const float s = scores[m];
      for (int64_t c = 0; c < d; ++c) g[c] += s * row[c];
    }
  }
}

// Both backwards of the bag in one pass over each touched row (read once, not once per
// position): dscores_NK as bag_backward_scores and grad_UD as bag_backward_values, the
// same bits, through the reverse index (rows_U, offsets_U1, order_M) of idx_NK. With
// bag_offsets_N1 (bags of any length, as bag_forward's), entry m belongs to the bag whose
// range holds it and dscores is 1-D, one per entry.
std::vector<torch::Tensor> bag_backward(torch::Tensor values_VD, torch::Tensor rows_U,
                                        torch::Tensor offsets_U1, torch::Tensor order_M,
                                        torch::Tensor scores_M, torch::Tensor dy_ND, int64_t k,
                                        std::optional<torch::Tensor> bag_offsets_N1) {
  const int64_t u_count = rows_U.size(0), d = dy_ND.size(1), n = dy_ND.size(0);
  const int64_t m_count = order_M.size(0);
  std::vector<int64_t> bag_of;  // the bag of each entry, for bags of any length
  if (bag_offsets_N1) {
    const int64_t* bags = bag_offsets_N1->data_ptr<int64_t>();
    bag_of.resize(m_count);
    for (int64_t b = 0; b < n; ++b) std::fill(bag_of.data() + bags[b], bag_of.data() + bags[b + 1], b);
  }
  auto grad_UD = gradient_pool().empty(u_count, d);
  auto dscores_NK = bag_offsets_N1 ? torch::empty({m_count}, dy_ND.options())
                                   : torch::empty({n, k}, dy_ND.options());
  const int64_t* rows = rows_U.data_ptr<int64_t>();
  const int64_t* order = order_M.data_ptr<int64_t>();
  const int64_t* offsets = offsets_U1.data_ptr<int64_t>();
  const float* values = values_VD.data_ptr<float>();
  const float* scores = scores_M.data_ptr<float>();
  const float* dy = dy_ND.data_ptr<float>();
  float* grad = grad_UD.data_ptr<float>();
  float* dscores = dscores_NK.data_ptr<float>();
  const int64_t* bags_of = bag_of.empty() ? nullptr : bag_of.data();
  const int64_t per_row = std::max<int64_t>(1, m_count / std::max<int64_t>(1, u_count));
  at::parallel_for(0, u_count, grain(2 * per_row * d), [&](int64_t begin, int64_t end) {
    bag_rows(begin, end, d, k, bags_of, rows, order, offsets, values, scores, dy, grad, dscores);
  });
  return {dscores_NK, grad_UD};
}

// Rows [begin, end) of sum_squares: each row's squares in double, in 8 lanes folded in a
// fixed tree (so they vectorise without reassociating), into row_sums.
__attribute__((target_clones("avx2", "default"))) void row_squares(const float* g, int64_t d,
                                                                    int64_t begin, int64_t end,
                                                                    double* row_sums) {
  constexpr int64_t lanes = 8;
  const int64_t body = d - d % lanes;
  for (int64_t u = begin; u < end; ++u) {
    const float* r = g + u * d;
    double acc[lanes] = {0.0};
    for (int64_t c = 0; c < body; c += lanes) {
      for (int64_t j = 0; j < lanes; ++j) {
        const double x = r[c + j];
        acc[j] += x * x;
      }
    }
    for (int64_t w = lanes / 2; w > 0; w /= 2) {
      for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
    }
    double out = acc[0];
    for (int64_t c = body; c < d; ++c) {
      const double x = r[c];
      out += x * x;
    }
    row_sums[u] = out;
  }
}

// The squared norm of grad_UD in double: rows in parallel, their sums added in row order,
// so the result is the same for any thread count. No float64 copy of the gradient.
double sum_squares(torch::Tensor grad_UD) {
  const int64_t u_count = grad_UD.size(0), d = grad_UD.size(1);
  const float* g = grad_UD.data_ptr<float>();
  std::vector<double> row_sums(u_count);
  at::parallel_for(0, u_count, grain(d), [&](int64_t begin, int64_t end) {
    row_squares(g, d, begin, end, row_sums.data());
  });
  double total = 0.0;
  for (int64_t u = 0; u < u_count; ++u) total += row_sums[u];
  return total;
}

// What sparse_update's rows need: pointers (nullptr for state the optimizer lacks) and
// the fp32 constants.
struct Update {
  float* values;
  const int64_t* rows;
  const float* grad;
  float* sum_sq;
  float* exp_avg;
  float* exp_avg_sq;
  int64_t* step;
  const float* bc1;
  const float* bc2;
  int64_t code, d;
  bool decays;
  float lr, eps, decay, b1, b2, one_b1, one_b2;
};

// Rows [begin, end) of sparse_update. Cloned for AVX2: the columns are independent, and
// division and square root are correctly rounded in both, so both compute the same bits.
__attribute__((target_clones("avx2", "default"))) void update_rows(const Update& a,
                                                                    int64_t begin, int64_t end) {
  const int64_t d = a.d;
  for (int64_t u = begin; u < end; ++u) {
    if (u + kAhead < end) {
      const int64_t ahead = a.rows[u + kAhead] * d;
      prefetch_row(a.values + ahead, d);
      if (a.code == 2) {
        prefetch_row(a.exp_avg + ahead, d);
        prefetch_row(a.exp_avg_sq + ahead, d);
      }
    }
    const int64_t r = a.rows[u];
    float* w = a.values + r * d;
    const float* g = a.grad + u * d;
    if (a.decays) {
      for (int64_t c = 0; c < d; ++c) w[c] *= a.decay;
    }
    if (a.code == 0) {
      for (int64_t c = 0; c < d; ++c) w[c] -= a.lr * g[c];
    } else if (a.code == 1) {
      const float acc = a.sum_sq[r] + dot(g, g, d) / static_cast<float>(d);
      a.sum_sq[r] = acc;
      const float denom = std::sqrt(acc) + a.eps;
      for (int64_t c = 0; c < d; ++c) w[c] -= a.lr * g[c] / denom;
    } else {
      a.step[r] += 1;
      const float bc1 = a.bc1[u], bc2 = a.bc2[u];
      float* m = a.exp_avg + r * d;
      float* v = a.exp_avg_sq + r * d;
      for (int64_t c = 0; c < d; ++c) {
        const float mc = a.b1 * m[c] + a.one_b1 * g[c];
        const float vc = a.b2 * v[c] + a.one_b2 * g[c] * g[c];
        m[c] = mc;
        v[c] = vc;
        w[c] -= a.lr * (mc / bc1) / (std::sqrt(vc / bc2) + a.eps);
      }
    }
  }
}

// One pass over each touched row: weight decay, then SGD (code 0), row-wise Adagrad (1)
// or lazy Adam (2) in fp32, in place. Rows are unique, so no two threads write one row.
// Adam's bias corrections bc1_U, bc2_U are per row, 1 - beta**t for the row's new step
// count t, computed by the caller in double (t small loses digits in fp32); empty
// tensors stand for the state an optimizer does not have.
void sparse_update(torch::Tensor values_VD, torch::Tensor rows_U, torch::Tensor grad_UD,
                   torch::Tensor sum_sq_V, torch::Tensor exp_avg_VD, torch::Tensor exp_avg_sq_VD,
                   torch::Tensor step_V, torch::Tensor bc1_U, torch::Tensor bc2_U, int64_t code,
                   double lr, double eps, double beta1, double beta2, double weight_decay) {
  const int64_t u_count = rows_U.size(0), d = values_VD.size(1);
  const Update a{
      values_VD.data_ptr<float>(),
      rows_U.data_ptr<int64_t>(),
      grad_UD.data_ptr<float>(),
      code == 1 ? sum_sq_V.data_ptr<float>() : nullptr,
      code == 2 ? exp_avg_VD.data_ptr<float>() : nullptr,
      code == 2 ? exp_avg_sq_VD.data_ptr<float>() : nullptr,
      code == 2 ? step_V.data_ptr<int64_t>() : nullptr,
      code == 2 ? bc1_U.data_ptr<float>() : nullptr,
      code == 2 ? bc2_U.data_ptr<float>() : nullptr,
      code,
      d,
      weight_decay != 0.0,
      static_cast<float>(lr),
      static_cast<float>(eps),
      static_cast<float>(1.0 - lr * weight_decay),
      static_cast<float>(beta1),
      static_cast<float>(beta2),
      static_cast<float>(1.0 - beta1),
      static_cast<float>(1.0 - beta2),
  };
  at::parallel_for(0, u_count, grain(4 * d),
                   [&](int64_t begin, int64_t end) { update_rows(a, begin, end); });
}

// Product-key half scores and their top-k without the (N, H, C) score matrix: for each
// token and head, s_c = <q_NHQ[n, h], keys[h, c]> (summed over the query in order; the
// keys come transposed, keysT_HQC, so 16 keys are scored at once), and the knn best
// (score descending; among equal scores the lower c first; NaN last), so every index
// returned is a real key.
std::vector<torch::Tensor> half_key_topk(torch::Tensor q_NHQ, torch::Tensor keysT_HQC,
                                         int64_t knn) {
  const int64_t n = q_NHQ.size(0), h = q_NHQ.size(1), qd = q_NHQ.size(2);
  const int64_t c_count = keysT_HQC.size(2);
  auto vals_NHK = torch::empty({n, h, knn}, q_NHQ.options());
  auto idx_NHK = torch::empty({n, h, knn}, q_NHQ.options().dtype(torch::kInt64));
  const float* q = q_NHQ.data_ptr<float>();
  const float* keysT = keysT_HQC.data_ptr<float>();
  float* vals = vals_NHK.data_ptr<float>();
  int64_t* idx = idx_NHK.data_ptr<int64_t>();
  at::parallel_for(0, n * h, grain(c_count * qd), [&](int64_t begin, int64_t end) {
    std::vector<float> scores(c_count);
    std::vector<uint32_t> keys(c_count);
    std::vector<int64_t> scratch(c_count + 1);
    for (int64_t nh = begin; nh < end; ++nh) {
      const float* qv = q + nh * qd;
      const float* kh = keysT + (nh % h) * qd * c_count;
      score_keys(qv, kh, qd, c_count, scores.data());
      float* bv = vals + nh * knn;
      int64_t* bi = idx + nh * knn;
      order_keys(scores.data(), keys.data(), c_count);
      select_best(keys.data(), c_count, knn, bi, scratch.data());
      for (int64_t j = 0; j < knn; ++j) bv[j] = scores[bi[j]];
    }
  });
  return {vals_NHK, idx_NHK};
}

namespace {

// dq rows [begin, end) of half_key_topk_backward (cloned for AVX2 like score_keys).
__attribute__((target_clones("avx2", "default"))) void topk_dq_rows(
    int64_t begin, int64_t end, int64_t h, int64_t qd, int64_t knn, int64_t c_count,
    const float* dv, const int64_t* idx, const float* keys, float* dq) {
  for (int64_t nh = begin; nh < end; ++nh) {
    const float* kh = keys + (nh % h) * c_count * qd;
    float* out = dq + nh * qd;
    for (int64_t j = 0; j < knn; ++j) {
      const float g = dv[nh * knn + j];
      const float* key = kh + idx[nh * knn + j] * qd;
      for (int64_t c = 0; c < qd; ++c) out[c] += g * key[c];
    }
  }
}

// dkeys of one head, tokens in order (cloned for AVX2 like score_keys).
__attribute__((target_clones("avx2", "default"))) void topk_dkeys_head(
    int64_t head, int64_t n, int64_t h, int64_t qd, int64_t knn, int64_t c_count,
    const float* dv, const int64_t* idx, const float* q, float* dkeys) {
  float* dk = dkeys + head * c_count * qd;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t nh = i * h + head;
    for (int64_t j = 0; j < knn; ++j) {
      const float g = dv[nh * knn + j];
      float* key = dk + idx[nh * knn + j] * qd;
      for (int64_t c = 0; c < qd; ++c) key[c] += g * q[nh * qd + c];
    }
  }
}

}  // namespace

// Gradients of half_key_topk's scores: dq_NHQ[n, h] = sum_k dvals[n, h, k] * keys[h, i],
// dkeys_HCQ[h, i] += dvals[n, h, k] * q[n, h] with i = idx[n, h, k], summed per head in
// (n, k) order by one thread, so the sums do not depend on the thread count.
std::vector<torch::Tensor> half_key_topk_backward(torch::Tensor dvals_NHK, torch::Tensor idx_NHK,
                                                  torch::Tensor q_NHQ, torch::Tensor keys_HCQ) {
  const int64_t n = q_NHQ.size(0), h = q_NHQ.size(1), qd = q_NHQ.size(2);
  const int64_t knn = idx_NHK.size(2), c_count = keys_HCQ.size(1);
  auto dq_NHQ = torch::zeros_like(q_NHQ);
  auto dkeys_HCQ = torch::zeros_like(keys_HCQ);
  const float* dv = dvals_NHK.data_ptr<float>();
  const int64_t* idx = idx_NHK.data_ptr<int64_t>();
  const float* q = q_NHQ.data_ptr<float>();
  const float* keys = keys_HCQ.data_ptr<float>();
  float* dq = dq_NHQ.data_ptr<float>();
  float* dkeys = dkeys_HCQ.data_ptr<float>();
  at::parallel_for(0, n * h, grain(knn * qd), [&](int64_t begin, int64_t end) {
    topk_dq_rows(begin, end, h, qd, knn, c_count, dv, idx, keys, dq);
  });
  at::parallel_for(0, h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; ++head) {
      topk_dkeys_head(head, n, h, qd, knn, c_count, dv, idx, q, dkeys);
    }
  });
  return {dq_NHQ, dkeys_HCQ};
}

namespace {

// Rows [begin, end) of query_norm, row r = (n * H + head) * 2 + half (cloned for AVX2:
// dot's lanes are explicit and nothing is contracted, so both clones give the same bits).
__attribute__((target_clones("avx2", "default"))) void query_norm_rows(
    int64_t begin, int64_t end, int64_t h, int64_t qd, const float* q, const float* gain,
    float scale, float eps, float* out0, float* out1, float* rstd) {
  for (int64_t r = begin; r < end; ++r) {
    const float* x = q + r * qd;
    const float inv = 1.f / std::sqrt(dot(x, x, qd) / static_cast<float>(qd) + eps);
    rstd[r] = inv;
    const int64_t nh = r / 2, half = r % 2;
    const float* g = gain + ((nh % h) * 2 + half) * qd;
    float* o = (half == 0 ? out0 : out1) + nh * qd;
    for (int64_t c = 0; c < qd; ++c) o[c] = x[c] * inv * g[c] * scale;
  }
}

// dq rows [begin, end) of query_norm_backward: with y = x * inv and dy = dout * g * scale,
// dx = inv * (dy - y * mean(dy * y)), the mean summed in dot's lanes and tree.
__attribute__((target_clones("avx2", "default"))) void query_norm_dq_rows(
    int64_t begin, int64_t end, int64_t h, int64_t qd, const float* d0, const float* d1,
    const float* q, const float* gain, const float* rstd, float scale, float* dq) {
  for (int64_t r = begin; r < end; ++r) {
    const float* x = q + r * qd;
    const float inv = rstd[r];
    const int64_t nh = r / 2, half = r % 2;
    const float* g = gain + ((nh % h) * 2 + half) * qd;
    const float* dout = (half == 0 ? d0 : d1) + nh * qd;
    float acc[kLanes] = {0.f};
    const int64_t body = qd - qd % kLanes;
    for (int64_t i = 0; i < body; i += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const int64_t c = i + j;
        acc[j] += dout[c] * g[c] * scale * (x[c] * inv);
      }
    }
    for (int64_t w = kLanes / 2; w > 0; w /= 2) {
      for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
    }
    float sum = acc[0];
    for (int64_t c = body; c < qd; ++c) sum += dout[c] * g[c] * scale * (x[c] * inv);
    const float mean = sum / static_cast<float>(qd);
    float* out = dq + r * qd;
    for (int64_t c = 0; c < qd; ++c) out[c] = inv * (dout[c] * g[c] * scale - x[c] * inv * mean);
  }
}

// dgain of one (head, half): sum over tokens in order of dout * scale * y.
__attribute__((target_clones("avx2", "default"))) void query_norm_dgain(
    int64_t pair, int64_t n, int64_t h, int64_t qd, const float* d0, const float* d1,
    const float* q, const float* rstd, float scale, float* dgain) {
  const int64_t head = pair / 2, half = pair % 2;
  const float* d = half == 0 ? d0 : d1;
  float* dg = dgain + pair * qd;
  for (int64_t c = 0; c < qd; ++c) dg[c] = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t nh = i * h + head, r = nh * 2 + half;
    const float* x = q + r * qd;
    const float* dout = d + nh * qd;
    const float inv = rstd[r];
    for (int64_t c = 0; c < qd; ++c) dg[c] += dout[c] * scale * (x[c] * inv);
  }
}

}  // namespace

// The product-key queries' RMS norm with a gain per (head, half) and a scale, split into
// the halves the two key sets score: out_half[n, h] = x * inv * gain[h, half] * scale with
// x = q_NH2Q[n, h, half] and inv = 1 / sqrt(mean(x^2) + eps) (F.rms_norm's formula), each
// half contiguous (N, H, Q); inv_NH2 is kept for the backward.
std::vector<torch::Tensor> query_norm(torch::Tensor q_NH2Q, torch::Tensor gain_H2Q,
                                      double scale, double eps) {
  const int64_t n = q_NH2Q.size(0), h = q_NH2Q.size(1), qd = q_NH2Q.size(3);
  auto out0 = torch::empty({n, h, qd}, q_NH2Q.options());
  auto out1 = torch::empty({n, h, qd}, q_NH2Q.options());
  auto rstd = torch::empty({n, h, 2}, q_NH2Q.options());
  const float* q = q_NH2Q.data_ptr<float>();
  const float* gain = gain_H2Q.data_ptr<float>();
  float* o0 = out0.data_ptr<float>();
  float* o1 = out1.data_ptr<float>();
  float* inv = rstd.data_ptr<float>();
  at::parallel_for(0, n * h * 2, grain(2 * qd), [&](int64_t begin, int64_t end) {
    query_norm_rows(begin, end, h, qd, q, gain, static_cast<float>(scale),
                    static_cast<float>(eps), o0, o1, inv);
  });
  return {out0, out1, rstd};
}

// Gradients of query_norm: dq_NH2Q from each half's output gradient, and dgain_H2Q summed
// over tokens in order by one thread per (head, half): the same for any thread count.
std::vector<torch::Tensor> query_norm_backward(torch::Tensor d0_NHQ, torch::Tensor d1_NHQ,
                                               torch::Tensor q_NH2Q, torch::Tensor gain_H2Q,
                                               torch::Tensor rstd_NH2, double scale) {
  const int64_t n = q_NH2Q.size(0), h = q_NH2Q.size(1), qd = q_NH2Q.size(3);
  auto dq_NH2Q = torch::empty_like(q_NH2Q);
  auto dgain_H2Q = torch::empty_like(gain_H2Q);
  const float* d0 = d0_NHQ.data_ptr<float>();
  const float* d1 = d1_NHQ.data_ptr<float>();
  const float* q = q_NH2Q.data_ptr<float>();
  const float* gain = gain_H2Q.data_ptr<float>();
  const float* inv = rstd_NH2.data_ptr<float>();
  float* dq = dq_NH2Q.data_ptr<float>();
  float* dg = dgain_H2Q.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, n * h * 2, grain(3 * qd), [&](int64_t begin, int64_t end) {
    query_norm_dq_rows(begin, end, h, qd, d0, d1, q, gain, inv, s, dq);
  });
  at::parallel_for(0, h * 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      query_norm_dgain(pair, n, h, qd, d0, d1, q, inv, s, dg);
    }
  });
  return {dq_NH2Q, dgain_H2Q};
}

// The knn best pairs (i, j) of two sorted top-knn lists a, b by a[i] + b[j]: ranks
// r1_NHK, r2_NHK, best first, equal sums in flat order i * knn + j. Only pairs with
// (i + 1) * (j + 1) <= knn can be among them (each such pair is beaten or tied by the
// (i + 1) * (j + 1) - 1 pairs above and left of it). With the lists' key indices i1, i2
// (not null) also the pairs' sums best = a[r1] + b[r2] and rows i1[r1] * n_keys + i2[r2].
void rank_pairs(const torch::Tensor& top1_NHK, const torch::Tensor& top2_NHK, int64_t* r1,
                int64_t* r2, const int64_t* i1, const int64_t* i2, int64_t n_keys, float* best,
                int64_t* rows_out) {
  const int64_t rows = top1_NHK.size(0) * top1_NHK.size(1), knn = top1_NHK.size(2);
  const float* a = top1_NHK.data_ptr<float>();
  const float* b = top2_NHK.data_ptr<float>();
  std::vector<int64_t> cand_i, cand_j;
  for (int64_t i = 0; i < knn; ++i) {
    for (int64_t j = 0; (i + 1) * (j + 1) <= knn; ++j) {
      cand_i.push_back(i);
      cand_j.push_back(j);
    }
  }
  const int64_t p_count = static_cast<int64_t>(cand_i.size());
  at::parallel_for(0, rows, grain(p_count * 4), [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> key(p_count);
    std::vector<int64_t> pick(knn), scratch(p_count + 1);
    for (int64_t row = begin; row < end; ++row) {
      const float* ar = a + row * knn;
      const float* br = b + row * knn;
      for (int64_t p = 0; p < p_count; ++p) key[p] = order_key(ar[cand_i[p]] + br[cand_j[p]]);
      select_best(key.data(), p_count, knn, pick.data(), scratch.data());
      for (int64_t j = 0; j < knn; ++j) {
        const int64_t x = row * knn + j, ri = cand_i[pick[j]], rj = cand_j[pick[j]];
        r1[x] = ri;
        r2[x] = rj;
        if (i1 != nullptr) {
          best[x] = ar[ri] + br[rj];
          rows_out[x] = i1[row * knn + ri] * n_keys + i2[row * knn + rj];
        }
      }
    }
  });
}

std::vector<torch::Tensor> best_pairs(torch::Tensor top1_NHK, torch::Tensor top2_NHK) {
  auto r1_NHK = torch::empty(top1_NHK.sizes(), top1_NHK.options().dtype(torch::kInt64));
  auto r2_NHK = torch::empty_like(r1_NHK);
  rank_pairs(top1_NHK, top2_NHK, r1_NHK.data_ptr<int64_t>(), r2_NHK.data_ptr<int64_t>(),
             nullptr, nullptr, 0, nullptr, nullptr);
  return {r1_NHK, r2_NHK};
}

// best_pairs and what the product keys make of them in one pass: the pairs' sums
// best_NHK, their rows rows_NHK = i1[r1] * n_keys + i2[r2], and the ranks r1, r2.
std::vector<torch::Tensor> product_pairs(torch::Tensor top1_NHK, torch::Tensor i1_NHK,
                                         torch::Tensor top2_NHK, torch::Tensor i2_NHK,
                                         int64_t n_keys) {
  auto r1_NHK = torch::empty(top1_NHK.sizes(), i1_NHK.options());
  auto r2_NHK = torch::empty_like(r1_NHK);
  auto best_NHK = torch::empty_like(top1_NHK);
  auto rows_NHK = torch::empty_like(r1_NHK);
  rank_pairs(top1_NHK, top2_NHK, r1_NHK.data_ptr<int64_t>(), r2_NHK.data_ptr<int64_t>(),
             i1_NHK.data_ptr<int64_t>(), i2_NHK.data_ptr<int64_t>(), n_keys,
             best_NHK.data_ptr<float>(), rows_NHK.data_ptr<int64_t>());
  return {best_NHK, rows_NHK, r1_NHK, r2_NHK};
}

// The lists' gradients from the pairs': dtop1[r1[j]] += dbest[j] (and dtop2 by r2), each
// row's in order j = 0 .. knn - 1 by one thread.
std::vector<torch::Tensor> product_pairs_backward(torch::Tensor dbest_NHK, torch::Tensor r1_NHK,
                                                  torch::Tensor r2_NHK) {
  const int64_t rows = dbest_NHK.size(0) * dbest_NHK.size(1), knn = dbest_NHK.size(2);
  auto d1_NHK = torch::zeros_like(dbest_NHK);
  auto d2_NHK = torch::zeros_like(dbest_NHK);
  const float* dbest = dbest_NHK.data_ptr<float>();
  const int64_t* r1 = r1_NHK.data_ptr<int64_t>();
  const int64_t* r2 = r2_NHK.data_ptr<int64_t>();
  float* d1 = d1_NHK.data_ptr<float>();
  float* d2 = d2_NHK.data_ptr<float>();
  at::parallel_for(0, rows, grain(2 * knn), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t j = 0; j < knn; ++j) {
        const int64_t x = row * knn + j;
        d1[row * knn + r1[x]] += dbest[x];
        d2[row * knn + r2[x]] += dbest[x];
      }
    }
  });
  return {d1_NHK, d2_NHK};
}

// advise_range over a tensor's storage, before its pages are first written.
void advise_huge_pages(torch::Tensor t) { advise_range(t.data_ptr(), t.nbytes()); }

// A lookup's entries split among the shards of a row plan, shard s holding rows
// [starts_M1[s], starts_M1[s + 1]) (every index lies in one of them: the caller checked).
// positions_E: the flat positions of shard 0's entries in order, then shard 1's, ...;
// offsets_MN1[s, n]: where bag n begins among shard s's entries (int32). Two passes over
// the entries in parallel over bags; for a few shards without a branch on an entry's
// shard (random, so mispredicted half the time): each bag's entries are counted, then
// compacted, per shard.
constexpr int64_t kFewShards = 8;  // up to this many: branchless, m passes over a bag

std::vector<torch::Tensor> row_entries(torch::Tensor idx_NK, torch::Tensor starts_M1) {
  const int64_t n = idx_NK.size(0), k = idx_NK.size(1), m = starts_M1.size(0) - 1;
  const int64_t* idx = idx_NK.data_ptr<int64_t>();
  const int64_t* bounds = starts_M1.data_ptr<int64_t>() + 1;  // shard s ends at bounds[s]
  auto offsets_MN1 = torch::zeros({m, n + 1}, torch::kInt32);
  auto positions_E = torch::empty({n * k}, torch::kInt64);
  auto shard_NK = torch::empty({n, k}, torch::kInt32);
  int32_t* off = offsets_MN1.data_ptr<int32_t>();
  int64_t* pos = positions_E.data_ptr<int64_t>();
  int32_t* shard = shard_NK.data_ptr<int32_t>();
  at::parallel_for(0, n, grain(k * m), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int32_t* sh = shard + i * k;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = idx[i * k + j];
        int32_t s = 0;
        if (m <= kFewShards) {
          for (int64_t t = 0; t + 1 < m; ++t) s += row >= bounds[t];
        } else {
          s = std::upper_bound(bounds, bounds + m, row) - bounds;
        }
        sh[j] = s;
        if (m > kFewShards) ++off[s * (n + 1) + i + 1];
      }
      for (int64_t s = 0; m <= kFewShards && s < m; ++s) {
        int32_t count = 0;
        for (int64_t j = 0; j < k; ++j) count += sh[j] == s;
        off[s * (n + 1) + i + 1] = count;
      }
    }
  });
  std::vector<int64_t> base(m + 1, 0);  // where shard s's entries begin among positions
  for (int64_t s = 0; s < m; ++s) {
    int32_t* o = off + s * (n + 1);
    for (int64_t i = 0; i < n; ++i) o[i + 1] += o[i];
    base[s + 1] = base[s] + o[n];
  }
  at::parallel_for(0, n, grain(k * m), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> mine(k + 1);  // one slot more: the last write may be no entry's
    std::vector<int64_t> at(m);
    for (int64_t i = begin; i < end; ++i) {
      const int32_t* sh = shard + i * k;
      if (m > kFewShards) {  // compacting per shard would cost m passes over the bag
        for (int64_t s = 0; s < m; ++s) at[s] = base[s] + off[s * (n + 1) + i];
        for (int64_t j = 0; j < k; ++j) pos[at[sh[j]]++] = i * k + j;
        continue;
      }
      for (int64_t s = 0; s < m; ++s) {
        int64_t count = 0;
        for (int64_t j = 0; j < k; ++j) {
          mine[count] = i * k + j;
          count += sh[j] == s;
        }
        std::memcpy(pos + base[s] + off[s * (n + 1) + i], mine.data(), count * sizeof(int64_t));
      }
    }
  });
  return {positions_E, offsets_MN1};
}

// Calls wait() on this thread while the other threads of its OpenMP team sleep on a
// condition variable instead of spinning. libgomp keeps an idle team thread spinning for
// GOMP_SPINCOUNT turns (300,000 when unset: milliseconds) after every parallel region; a
// worker that then blocks on its memory shards, processes on the same cores, would take
// a core from them for that long at each wait. Only the waits sleep: the spin still
// spares the dense model's parallel regions a wake-up between one another.
pybind11::object parked(pybind11::function wait) {
  const int threads = omp_get_max_threads();
  if (threads <= 1 || omp_in_parallel()) return wait();
  std::mutex mutex;
  std::condition_variable woken;
  bool done = false;
  pybind11::object result;
  std::exception_ptr error;
#pragma omp parallel num_threads(threads)
  {
    if (omp_get_thread_num() == 0) {  // the calling thread, which holds the GIL
      try {
        result = wait();
      } catch (...) {  // no exception may leave a parallel region: raised below
        error = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lock(mutex);
        done = true;
      }
      woken.notify_all();
    } else {
      std::unique_lock<std::mutex> lock(mutex);
      woken.wait(lock, [&] { return done; });
    }
  }
  if (error) std::rethrow_exception(error);
  return result;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("advise_huge_pages", &advise_huge_pages);
  m.def("best_pairs", &best_pairs);
  m.def("product_pairs", &product_pairs);
  m.def("product_pairs_backward", &product_pairs_backward);
  m.def("reverse_index", &reverse_index);
  m.def("half_key_topk", &half_key_topk);
  m.def("half_key_topk_backward", &half_key_topk_backward);
  m.def("query_norm", &query_norm);
  m.def("query_norm_backward", &query_norm_backward);
  m.def("bag_forward", &bag_forward);
  m.def("bag_backward_scores", &bag_backward_scores);
  m.def("bag_backward_values", &bag_backward_values);
  m.def("bag_backward", &bag_backward);
  m.def("sparse_update", &sparse_update);
  m.def("sum_squares", &sum_squares);
  m.def("parked", &parked);
  m.def("row_entries", &row_entries);
}
