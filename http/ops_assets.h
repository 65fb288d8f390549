// The operator's page (http/ops_page/), compiled into the binary by
// http/embed_assets.cmake.
#ifndef LATHE_HTTP_OPS_ASSETS_H_
#define LATHE_HTTP_OPS_ASSETS_H_

#include <optional>
#include <string_view>

namespace lathe::http {

// The bytes of http/ops_page/<name>; nullopt for an unknown name.
std::optional<std::string_view> OpsAsset(std::string_view name);

}  // namespace lathe::http

#endif  // LATHE_HTTP_OPS_ASSETS_H_
