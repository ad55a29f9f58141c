-- hindsight_py.welford: Welford's running statistics as trink's streaming_algorithms keeps them
-- (sa_running_stats: n, mean, and the sum of squared deviations from the mean), shared by the
-- running_stats and time_series stand-ins.

local sqrt = require "math".sqrt

local M = {}

function M.init(rs)
    rs.n, rs.mean, rs.sum = 0, 0, 0
    return rs
end

-- sa_add_running_stats, without its check for a finite value (the caller's)
function M.add(rs, d)
    local old_mean = rs.mean
    rs.n = rs.n + 1
    if rs.n == 1 then
        rs.mean = d
    else
        rs.mean = old_mean + (d - old_mean) / rs.n
        rs.sum = rs.sum + (d - old_mean) * (d - rs.mean)
    end
end

function M.sd(rs) return rs.n < 2 and 0 or sqrt(rs.sum / (rs.n - 1)) end

function M.usd(rs) return rs.n < 2 and 0 or sqrt(rs.sum / rs.n) end

return M
