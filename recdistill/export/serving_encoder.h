// recdistill: raw values -> the inputs of the student's AOTInductor package, in C++.
//
// Reads the encoding table written beside the package (student.encoding.txt; its format is
// described in recdistill/export/encoding.py) and encodes raw values exactly as the Python
// reader (recdistill.export.TableEncoder) and the TorchScript file's encoder do. Header only;
// needs libtorch (the torch wheel's include/ and lib/ are enough).
//
//   #include "serving_encoder.h"
//   #include <torch/csrc/inductor/aoti_package/model_package_loader.h>
//
//   recdistill::Encoder encoder("student.encoding.txt");
//   torch::inductor::AOTIModelPackageLoader loader("student.pt2");
//   std::map<std::string, at::Tensor> numbers{{"user_id", torch::tensor({196, 7})}, ...};
//   std::map<std::string, std::vector<std::string>> strings{{"gender", {"M", "F"}}, ...,
//                                                           {"genres", {"Comedy", "Drama", "War"}}};
//   std::map<std::string, at::Tensor> lengths{{"genres", torch::tensor({1, 2})}};
//   at::Tensor ratings = loader.run(encoder.encode(numbers, strings, lengths))[0];  // [B]
//
// A value never seen in training is index 0 (unknown); a missing or unexpected name, rows that
// differ, a float id or lengths that do not add up throw std::invalid_argument naming the input.
// The package takes batches of one row or more (Pt2Student answers an empty batch itself).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace recdistill {

// "%25" -> "%", "%09" -> tab, "%0A" -> line feed, "%0D" -> carriage return.
inline std::string unescape(const std::string& value) {
  std::string out;
  out.reserve(value.size());
  for (size_t i = 0; i < value.size(); ++i) {
    if (value[i] == '%' && i + 2 < value.size()) {
      std::string code = value.substr(i + 1, 2);
      if (code == "25") { out += '%'; i += 2; continue; }
      if (code == "09") { out += '\t'; i += 2; continue; }
      if (code == "0A") { out += '\n'; i += 2; continue; }
      if (code == "0D") { out += '\r'; i += 2; continue; }
    }
    out += value[i];
  }
  return out;
}

// 32-bit FNV-1a of the bytes (features.spec.stable_hash).
inline int64_t fnv1a32(const std::string& value) {
  uint32_t h = 0x811C9DC5u;
  for (unsigned char byte : value) h = (h ^ byte) * 0x01000193u;
  return static_cast<int64_t>(h);
}

// The first `length` characters of UTF-8 `value` (a continuation byte is 0b10xxxxxx).
inline std::string char_prefix(const std::string& value, int64_t length) {
  int64_t count = 0;
  size_t end = 0;
  for (size_t i = 0; i < value.size(); ++i) {
    if ((static_cast<unsigned char>(value[i]) & 0xC0) != 0x80) {
      if (count == length) break;
      ++count;
    }
    end = i + 1;
  }
  return value.substr(0, end);
}

inline bool ascii_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

// `value` without surrounding ASCII whitespace, ASCII lower-cased when `fold`.
inline std::string normalize(const std::string& value, bool fold) {
  size_t start = 0, end = value.size();
  while (start < end && ascii_space(value[start])) ++start;
  while (end > start && ascii_space(value[end - 1])) --end;
  std::string out = value.substr(start, end - start);
  if (fold)
    for (char& c : out)
      if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return out;
}

// One input feature's encoding (a block of the table).
struct Rule {
  std::string name, dict, rule;
  int64_t column = 0, length = 0, buckets = 0;
  bool fold = false;
  double width = 0;
  std::unordered_map<std::string, int64_t> index;  // string, multi
  std::unordered_map<int64_t, int64_t> integers;   // integer
  std::unordered_map<double, int64_t> floors;      // floor
  std::vector<double> lower;                       // bounds: each bucket's lowest value
  std::vector<int64_t> bucket;                     // bounds: its index

  int64_t string_index(const std::string& value) const {
    std::string cut = length > 0 ? char_prefix(value, length) : value;
    if (buckets > 0) return 1 + fnv1a32(cut) % buckets;
    auto found = index.find(cut);
    if (found != index.end()) return found->second;
    std::string key = normalize(value, fold);
    found = index.find(length > 0 ? char_prefix(key, length) : key);
    return found != index.end() ? found->second : 0;
  }

  int64_t integer_index(int64_t value) const {
    if (buckets > 0) return 1 + fnv1a32(std::to_string(value)) % buckets;
    auto found = integers.find(value);
    return found != integers.end() ? found->second : 0;
  }

  int64_t number_index(double x) const {
    if (std::isnan(x)) return 0;
    if (rule == "floor") {
      auto found = floors.find(std::floor(x / width) * width);
      return found != floors.end() ? found->second : 0;
    }
    auto above = std::upper_bound(lower.begin(), lower.end(), x);
    return bucket[static_cast<size_t>(above - lower.begin()) - 1];
  }
};

class Encoder {
 public:
  explicit Encoder(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error(path + ": cannot open the encoding table");
    std::string line, word;
    std::getline(in, line);
    if (line != "recdistill-encoding 1")
      throw std::runtime_error(path + ": not a recdistill encoding table");
    int64_t n_single = 0, n_bags = 0;
    std::getline(in, line);
    std::istringstream(line) >> word >> n_single >> word >> n_bags;
    for (int64_t f = 0; f < n_single + n_bags; ++f) {
      std::getline(in, line);
      std::istringstream head(line);
      Rule r;
      int fold = 0;
      int64_t count = 0;
      head >> word >> r.name >> r.dict >> r.rule >> r.column >> fold >> r.length >> r.buckets >> r.width >> count;
      if (word != "feature") throw std::runtime_error(path + ": expected a feature block, got: " + line);
      r.fold = fold == 1;
      for (int64_t e = 0; e < count; ++e) {
        std::getline(in, line);
        size_t tab = line.rfind('\t');
        std::string key = line.substr(0, tab);
        int64_t value = std::stoll(line.substr(tab + 1));
        if (r.rule == "string" || r.rule == "multi") r.index[unescape(key)] = value;
        else if (r.rule == "integer") r.integers[std::stoll(key)] = value;
        else if (r.rule == "floor") r.floors[std::strtod(key.c_str(), nullptr)] = value;
        else { r.lower.push_back(std::strtod(key.c_str(), nullptr)); r.bucket.push_back(value); }
      }
      (f < n_single ? single_ : bags_).push_back(std::move(r));
    }
  }

  // The package's inputs: [B, F1] indices, then each bag's [V] values, then each bag's [B] starts.
  std::vector<at::Tensor> encode(const std::map<std::string, at::Tensor>& numbers,
                                 const std::map<std::string, std::vector<std::string>>& strings,
                                 const std::map<std::string, at::Tensor>& lengths) const {
    check_names("numbers", numbers, "numbers");
    check_names("strings", strings, "strings");
    check_names("lengths", lengths, "lengths");
    int64_t rows = -1;
    std::string first;
    auto count_rows = [&](const std::string& label, int64_t n) {
      if (rows < 0) { rows = n; first = label; }
      else if (n != rows)
        throw std::invalid_argument("serving input " + label + " has " + std::to_string(n) + " rows, " +
                                    first + " has " + std::to_string(rows));
    };
    std::vector<std::vector<int64_t>> columns;
    for (const Rule& r : single_) {
      std::vector<int64_t> column;
      if (r.dict == "numbers") {
        at::Tensor raw = numbers.at(r.name);
        std::string label = "numbers['" + r.name + "']";
        if (raw.dim() != 1) throw std::invalid_argument("serving input " + label + " must have shape [B]");
        if (r.rule == "integer") {
          if (!at::isIntegralType(raw.scalar_type(), /*includeBool=*/false))
            throw std::invalid_argument("serving input " + label + " must be an integer tensor");
          at::Tensor values = raw.to(at::kLong).contiguous();
          const int64_t* v = values.data_ptr<int64_t>();
          for (int64_t i = 0; i < values.numel(); ++i) column.push_back(r.integer_index(v[i]));
        } else {
          at::Tensor values = raw.to(at::kDouble).contiguous();
          const double* v = values.data_ptr<double>();
          for (int64_t i = 0; i < values.numel(); ++i) column.push_back(r.number_index(v[i]));
        }
        count_rows(label, raw.size(0));
      } else {
        for (const std::string& value : strings.at(r.name)) column.push_back(r.string_index(value));
        count_rows("strings['" + r.name + "']", static_cast<int64_t>(column.size()));
      }
      columns.push_back(std::move(column));
    }
    std::vector<at::Tensor> values, starts;
    for (const Rule& r : bags_) {
      const std::vector<std::string>& raw = strings.at(r.name);
      std::vector<int64_t> found;
      for (const std::string& value : raw) found.push_back(r.string_index(value));
      at::Tensor counts = lengths.at(r.name);
      if (counts.dim() != 1 || !at::isIntegralType(counts.scalar_type(), false))
        throw std::invalid_argument("serving input lengths['" + r.name + "'] must be an integer tensor of shape [B]");
      counts = counts.to(at::kLong).contiguous();
      const int64_t* c = counts.data_ptr<int64_t>();
      std::vector<int64_t> start(counts.numel());
      int64_t total = 0;
      bool negative = false;
      for (int64_t i = 0; i < counts.numel(); ++i) {
        negative = negative || c[i] < 0;
        start[i] = total;
        total += c[i];
      }
      if (negative || total != static_cast<int64_t>(raw.size()))
        throw std::invalid_argument("serving input lengths['" + r.name + "'] must be non-negative and sum to len(strings['" +
                                    r.name + "']) = " + std::to_string(raw.size()));
      count_rows("lengths['" + r.name + "']", counts.numel());
      values.push_back(at::tensor(found, at::kLong));
      starts.push_back(at::tensor(start, at::kLong));
    }
    int64_t width = static_cast<int64_t>(columns.size());
    at::Tensor single = at::zeros({std::max<int64_t>(rows, 0), width}, at::kLong);
    int64_t* s = single.data_ptr<int64_t>();
    for (int64_t j = 0; j < width; ++j)
      for (int64_t i = 0; i < rows; ++i) s[i * width + j] = columns[j][i];
    std::vector<at::Tensor> inputs{single};
    inputs.insert(inputs.end(), values.begin(), values.end());
    inputs.insert(inputs.end(), starts.begin(), starts.end());
    return inputs;
  }

 private:
  std::vector<Rule> single_, bags_;

  template <typename Map>
  void check_names(const std::string& label, const Map& given, const std::string& dict) const {
    std::vector<std::string> expected;
    for (const Rule& r : single_)
      if (r.dict == dict) expected.push_back(r.name);
    for (const Rule& r : bags_)
      if (dict != "numbers") expected.push_back(r.name);
    for (const auto& entry : given)
      if (std::find(expected.begin(), expected.end(), entry.first) == expected.end())
        throw std::invalid_argument("serving input " + label + "['" + entry.first + "']: not a feature this model takes");
    for (const std::string& name : expected)
      if (!given.count(name)) throw std::invalid_argument("serving input " + label + "['" + name + "'] is missing");
  }
};

}  // namespace recdistill
