// Torch binding of the CPU sink + window attention kernel (sink_window_core.h):
// checks the tensors, fills the parameters and runs the work items on
// torch's own thread pool (at::parallel_for), so the op follows the
// engine's thread settings.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "sink_window_core.h"

namespace {

template <typename T>
void launch(const lt::Params& p) {
  const std::vector<lt::Item> items = lt::make_items(p);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    lt::run_items<T>(p, items.data(), begin, end);
  });
}

}  // namespace

void sink_window_attention(const at::Tensor& query, const at::Tensor& kv_cache,
                           const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                           const at::Tensor& block_table, at::Tensor output, int64_t sink,
                           int64_t window, double scale, int64_t tile) {
  TORCH_CHECK(query.dim() == 3 && kv_cache.dim() == 4 && output.dim() == 3, "bad ranks");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() && output.scalar_type() == query.scalar_type(),
              "query, kv_cache and output must share a dtype");
  TORCH_CHECK(query.stride(2) == 1 && kv_cache.stride(3) == 1 && output.stride(2) == 1,
              "last dimensions must be contiguous");
  TORCH_CHECK(kv_cache.size(3) == 2 * query.size(2), "kv_cache last dim must be 2 * head_size");
  TORCH_CHECK(query.size(1) % kv_cache.size(1) == 0, "heads must be a multiple of KV heads");
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  block_table.scalar_type() == at::kInt,
              "metadata must be int32");
  TORCH_CHECK(query_start_loc.is_contiguous() && seq_lens.is_contiguous() && block_table.stride(1) == 1,
              "metadata must be contiguous");
  TORCH_CHECK(tile >= 1, "tile must be >= 1");
  lt::Params p;
  p.query = query.data_ptr();
  p.q_s0 = query.stride(0);
  p.q_s1 = query.stride(1);
  p.kv = kv_cache.data_ptr();
  p.kv_sb = kv_cache.stride(0);
  p.kv_sh = kv_cache.stride(1);
  p.kv_ss = kv_cache.stride(2);
  p.out = output.data_ptr();
  p.o_s0 = output.stride(0);
  p.o_s1 = output.stride(1);
  p.qsl = query_start_loc.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.table = block_table.data_ptr<int32_t>();
  p.table_stride = block_table.stride(0);
  p.num_reqs = static_cast<int>(seq_lens.size(0));
  p.num_heads = static_cast<int>(query.size(1));
  p.num_kv_heads = static_cast<int>(kv_cache.size(1));
  p.head_size = static_cast<int>(query.size(2));
  p.block_size = static_cast<int>(kv_cache.size(2));
  p.sink = sink;
  p.window = window;
  p.scale = static_cast<float>(scale);
  p.tile = static_cast<int>(tile);
  switch (query.scalar_type()) {
    case at::kFloat: return launch<float>(p);
    case at::kBFloat16: return launch<lt::bf16>(p);
    case at::kHalf: return launch<lt::f16>(p);
    default: TORCH_CHECK(false, "unsupported dtype ", query.scalar_type());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sink_window_attention", &sink_window_attention, "LightTransfer sink + window paged attention (CPU)");
}
