// RTD datastores: the index Session.make_rtd_index builds (searched and
// queried directly here for tests and tools) and the logit blend applied
// during generation, exposed on its own for checking against Python.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "bind_common.h"
#include "rtd.h"

namespace slot::bind {

void bind_rtd(py::module_& m) {
    // shared_ptr holder: a Request and the running generation keep the index
    // alive after Python drops it.
    py::class_<RtdIndex, std::shared_ptr<RtdIndex>>(m, "RtdIndex")
        .def_property_readonly("size", &RtdIndex::size)
        .def_property_readonly("dim", &RtdIndex::dim)
        .def_property_readonly("heads", &RtdIndex::heads)
        .def_property_readonly("nlist", &RtdIndex::nlist)
        .def_property_readonly("backend", [](const RtdIndex& i) { return std::string(i.backend_name()); })
        .def("set_ivf",
             [](RtdIndex& index, const FloatArray& centroids, const std::vector<int64_t>& offsets) {
                 std::vector<float> c = from_numpy(centroids);
                 without_gil([&] { index.set_ivf(std::move(c), offsets); });
             },
             py::arg("centroids"), py::arg("offsets"))
        .def("search",
             [](const RtdIndex& index, const FloatArray& q, int k, int nprobe) {
                 if (q.ndim() != 2 || q.shape(1) != index.dim()) {
                     throw std::invalid_argument("queries must have shape (n, " + std::to_string(index.dim()) + ")");
                 }
                 const auto nq = static_cast<py::ssize_t>(q.shape(0));
                 const std::vector<RtdNeighbours> found =
                     without_gil([&] { return index.search(q.data(), nq, k, nprobe); });
                 const auto H = static_cast<py::ssize_t>(index.heads());
                 py::array_t<float> dist({nq, H, static_cast<py::ssize_t>(k)});
                 py::array_t<int64_t> ids({nq, H, static_cast<py::ssize_t>(k)});
                 for (py::ssize_t b = 0; b < nq; ++b) {
                     const auto& nb = found[static_cast<size_t>(b)];
                     std::copy(nb.distances.begin(), nb.distances.end(), dist.mutable_data() + b * H * k);
                     std::copy(nb.ids.begin(), nb.ids.end(), ids.mutable_data() + b * H * k);
                 }
                 return py::make_tuple(dist, ids);
             },
             py::arg("queries"), py::arg("k"), py::arg("nprobe") = 0)
        .def("reference",
             [](const RtdIndex& index, const FloatArray& q, int k, double temperature, int nprobe) {
                 if (q.ndim() != 1 || q.shape(0) != index.dim()) {
                     throw std::invalid_argument("the query must have " + std::to_string(index.dim()) + " values");
                 }
                 if (!(temperature > 0.0)) throw std::invalid_argument("temperature must be > 0");
                 return without_gil([&] {
                     const auto found = index.search(q.data(), 1, k, nprobe);
                     return rtd_reference(found.front(), index.values(), index.heads(), temperature);
                 });
             },
             py::arg("query"), py::arg("k"), py::arg("temperature"), py::arg("nprobe") = 0);

    m.def("rtd_blend",
          [](const FloatArray& logits, const std::vector<std::pair<int32_t, double>>& reference, double lam) {
              std::vector<float> z = from_numpy(logits);
              for (const auto& [v, r] : reference) {
                  if (v < 0 || static_cast<size_t>(v) >= z.size()) throw std::invalid_argument("reference token out of range");
              }
              if (!(lam >= 0.0 && lam <= 1.0)) throw std::invalid_argument("lambda must be in [0, 1]");
              rtd_blend(z.data(), static_cast<int64_t>(z.size()), reference, lam);
              return to_numpy(z);
          },
          py::arg("logits"), py::arg("reference"), py::arg("lam"));
}

}  // namespace slot::bind
